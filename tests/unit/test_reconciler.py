"""The reconciler's decisions, as a pure function of what etcd holds and what the executor
sees: which nodes start and stop, the next status, and the events that tell the story."""

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.executor import Observed, failure_line
from service.reconciler import decide, progress_interval, progress_line
from service.store import JobView

SEC = 1_000_000_000
T0 = 1_000 * SEC


def _view(nodes=2, status=None, **kw):
    spec = pb.JobSpec(config_toml="", num_nodes=nodes, procs_per_node=2)
    return JobView("j", spec, status=status, status_revision=7 if status else 0, **kw)


def _running(nodes=2, **fields):
    status = pb.JobStatus(state=pb.RUNNING, **fields)
    status.create_time.FromNanoseconds(T0)
    status.start_time.FromNanoseconds(T0)
    for k in range(nodes):
        status.nodes.add(index=k, state=pb.NODE_RUNNING, pid=100 + k)
    return status


def test_a_new_job_starts_every_node_and_says_so():
    plan = decide(_view(3), {}, T0 + SEC, created_ns=T0)
    assert plan.start == [0, 1, 2] and plan.stop == []
    assert plan.status.state == pb.RUNNING
    assert plan.status.create_time.ToNanoseconds() == T0
    assert [n.state for n in plan.status.nodes] == [pb.NODE_RUNNING] * 3
    assert [(e.type, e.state) for e in plan.events] == [
        ("created", pb.PENDING),
        ("state", pb.RUNNING),
    ]
    assert "3 node(s) x 2 process(es), world 6" in plan.events[0].message


def test_cancel_before_anything_started_starts_nothing():
    plan = decide(_view(2, cancel=True), {}, T0, created_ns=T0)
    assert plan.start == [] and plan.stop == []
    assert plan.status.state == pb.CANCELLED
    assert plan.events[-1].state == pb.CANCELLED


def test_cancel_while_running_stops_the_running_nodes():
    plan = decide(_view(2, _running(), cancel=True), {}, T0 + SEC, created_ns=T0)
    assert plan.stop == [0, 1] and plan.start == []
    assert [n.state for n in plan.status.nodes] == [pb.NODE_STOPPED] * 2
    assert (plan.status.state, plan.events[-1].type) == (pb.CANCELLED, "state")


def test_a_node_that_fails_fails_the_job_and_stops_the_others():
    observed = {0: Observed(running=True), 1: Observed(False, exit_code=3)}
    lines = {1: "megamoe: error: out of data"}
    plan = decide(_view(2, _running()), observed, T0 + SEC, T0, lines)
    assert plan.stop == [0]
    node = plan.status.nodes[1]
    assert (node.state, node.exit_code) == (pb.NODE_FAILED, 3)
    assert plan.status.state == pb.FAILED
    assert plan.status.message == "node 1 exited with code 3: megamoe: error: out of data"
    # the watcher stops at the first terminal event: only the last one carries FAILED
    assert [(e.type, e.state) for e in plan.events] == [
        ("node_exited", pb.RUNNING),
        ("state", pb.FAILED),
    ]
    assert plan.events[0].node == 1 and plan.events[0].details["exit_code"] == "3"


def test_the_node_with_the_real_error_is_named_not_the_peer_that_lost_it():
    observed = {0: Observed(False, exit_code=1), 1: Observed(False, exit_code=1)}
    lines = {0: "RuntimeError: Connection closed by peer", 1: "megamoe: error: bad corpus"}
    plan = decide(_view(2, _running()), observed, T0 + SEC, T0, lines)
    assert plan.status.message.startswith("node 1 exited with code 1: megamoe: error")


def test_a_node_killed_by_a_signal_or_gone_is_described_so():
    observed = {0: Observed(False, exit_code=137, signal=9), 1: Observed(False, lost=True)}
    plan = decide(_view(2, _running()), observed, T0 + SEC, T0)
    messages = [n.message for n in plan.status.nodes]
    assert messages == ["killed by SIGKILL", "gone without an exit code"]
    assert plan.status.nodes[0].signal == 9


def test_all_nodes_done_with_the_result_is_success_with_loss_and_summary():
    observed = {0: Observed(False, exit_code=0), 1: Observed(False, exit_code=0)}
    result = {"final_loss": 2.5, "summary_path": "/s.json", "steps": 10, "tokens": 4096}
    plan = decide(_view(2, _running(), result=result), observed, T0 + SEC, T0)
    s = plan.status
    assert (s.state, s.final_loss, s.summary_path, s.step) == (pb.SUCCEEDED, 2.5, "/s.json", 10)
    assert s.end_time.ToNanoseconds() == T0 + SEC
    assert [e.type for e in plan.events] == ["node_exited", "node_exited", "state"]


def test_one_node_done_and_one_running_is_still_running():
    observed = {0: Observed(False, exit_code=0), 1: Observed(running=True)}
    plan = decide(_view(2, _running()), observed, T0 + SEC, T0)
    assert plan.status.state == pb.RUNNING and plan.stop == []
    assert [n.state for n in plan.status.nodes] == [pb.NODE_SUCCEEDED, pb.NODE_RUNNING]


def test_progress_lands_in_the_status_and_as_an_event_at_most_every_interval():
    report = {"step": 10, "total_steps": 100, "tokens": 20480, "loss": 3.25}
    report |= {"tokens_per_s": 2048.0, "mfu": 0.125}
    view = _view(2, _running(), ranks={0: report})
    plan = decide(view, {}, T0 + 60 * SEC, T0, last_progress_ns=T0)
    s = plan.status
    assert (s.step, s.total_steps, s.tokens, s.last_loss, s.mfu) == (10, 100, 20480, 3.25, 0.125)
    assert [e.type for e in plan.events] == ["progress"]
    assert plan.events[0].message == progress_line(s)
    assert "ETA 1m30s" in plan.events[0].message  # 90 steps x 2048 tokens at 2048 tokens/s
    soon = decide(view, {}, T0 + 60 * SEC, T0, last_progress_ns=T0 + 58 * SEC)
    assert soon.status.step == 10 and soon.events == []  # in the status, no event yet


def test_progress_events_thin_out_as_a_run_ages():
    assert progress_interval(10) == 5.0
    assert progress_interval(30 * 24 * 3600) == 30 * 24 * 3600 / 1000  # 43 min a month in


def test_each_new_checkpoint_is_one_event():
    ckpt = {"step": 20, "path": "/c/step-00000020"}
    plan = decide(_view(2, _running(), checkpoint=ckpt), {}, T0 + SEC, T0)
    assert (plan.status.last_checkpoint_step, plan.status.last_checkpoint) == (20, ckpt["path"])
    assert [e.type for e in plan.events] == ["checkpoint"]
    again = decide(_view(2, plan.status, checkpoint=ckpt), {}, T0 + 2 * SEC, T0)
    assert again.events == [] and not again.changed(plan.status)


def test_a_finished_job_is_left_alone():
    done = _running()
    done.state = pb.SUCCEEDED
    plan = decide(_view(2, done, cancel=True), {0: Observed(False, exit_code=1)}, T0, T0)
    assert plan.start == plan.stop == plan.events == [] and plan.status == done


def test_the_failure_line_prefers_our_error_then_an_exception_then_any_words():
    log = [
        "megamoe: error: prepared data directory /x does not exist",
        "[rank1]: RuntimeError: Connection closed by peer",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  exitcode  : 1 (pid: 3871)",
        "============================================================",
    ]
    assert failure_line(log) == log[0]
    assert failure_line(log[1:]) == log[1]
    assert failure_line(["Killed", "=====", ""]) == "Killed"
    assert failure_line([]) == ""

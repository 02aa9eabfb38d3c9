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
    assert plan.stop == [0, 1]  # the failed node too: whatever it left behind
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


def test_commits_between_two_looks_are_one_event_each_in_order():
    # the key holds the newest commit and lists the recent ones (trainer.elastic.report)
    commits = [[s, f"/c/step-{s:08d}"] for s in (10, 20, 30)]
    seen = decide(_view(2, _running(), checkpoint=_ckpt(commits[:1])), {}, T0 + SEC, T0)
    plan = decide(_view(2, seen.status, checkpoint=_ckpt(commits)), {}, T0 + 2 * SEC, T0)
    assert [e.details["step"] for e in plan.events] == ["20", "30"]
    assert [e.details["path"] for e in plan.events] == ["/c/step-00000020", "/c/step-00000030"]
    assert (plan.status.last_checkpoint_step, plan.status.last_checkpoint) == (30, commits[2][1])


def _ckpt(commits):
    step, path = commits[-1]
    return {"step": step, "path": path, "commits": commits}


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


def _restartable(max_restarts=2, backoff=4.0, status=None, **kw):
    view = _view(2, status or _running(step=30), **kw)
    view.spec.restart.max_restarts = max_restarts
    view.spec.restart.backoff_seconds = backoff
    return view


def test_a_failure_within_the_budget_stops_the_world_and_restarts_it_after_the_backoff():
    observed = {0: Observed(running=True), 1: Observed(False, exit_code=-9, signal=9)}
    plan = decide(_restartable(), observed, T0 + 10 * SEC, T0)
    s = plan.status
    assert plan.stop == [0, 1] and plan.start == []
    assert s.state == pb.RUNNING and s.restarts == 1 and s.nodes[1].restarts == 1
    assert s.recovery.failed_step == 30 and s.recovery.attempt == 1
    assert s.recovery.restart_time.ToNanoseconds() == T0 + 14 * SEC  # 4 s of backoff
    assert [e.type for e in plan.events] == ["node_exited", "restarting"]
    assert "attempt 1 of 2" in plan.events[-1].message and "in 4 s" in plan.events[-1].message
    assert {e.state for e in plan.events} == {pb.RUNNING}  # a watcher keeps watching

    early = decide(_restartable(status=s), {}, T0 + 13 * SEC, T0)
    assert early.start == [] and not early.changed(s)  # still backing off
    later = decide(_restartable(status=s), {}, T0 + 14 * SEC, T0)
    assert later.start == [0, 1] and later.status.generation == 1
    assert [n.state for n in later.status.nodes] == [pb.NODE_RUNNING] * 2
    assert [e.type for e in later.events] == ["restarted"]


PEER_GONE = (
    "[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:10661. This is typically caused by a remote worker crashing."
)


def test_a_node_that_only_lost_a_peer_waits_for_the_node_that_failed_first():
    # node 1's worker was killed; node 0's rank saw the connection go and exited first
    victim = {0: Observed(False, exit_code=1), 1: Observed(running=True)}
    held = decide(_restartable(), victim, T0 + 10 * SEC, T0, {0: PEER_GONE})
    s = held.status
    assert held.stop == [] and s.restarts == 0 and not s.HasField("recovery")
    assert [e.type for e in held.events] == ["node_exited"]
    assert s.nodes[0].end_time.ToNanoseconds() == T0 + 10 * SEC
    assert "lost a peer; waiting for the node that failed first" in s.message
    # a moment later the killed node's agent reports: the restart names it
    cause = {1: Observed(False, exit_code=1, signal=9)}
    plan = decide(_restartable(status=s), cause, T0 + 11 * SEC, T0, {1: "exitcode: -9 (SIGKILL)"})
    assert [e.type for e in plan.events] == ["node_exited", "restarting"]
    assert "node 1 killed by SIGKILL" in plan.events[-1].message
    assert sorted(plan.stop) == [0, 1] and plan.status.restarts == 1  # node 0 leftovers too
    assert [n.restarts for n in plan.status.nodes] == [1, 1]


def test_the_wait_for_a_cause_is_bounded_and_a_single_pass_picks_the_cause():
    victim = {0: Observed(False, exit_code=1), 1: Observed(running=True)}
    held = decide(_restartable(), victim, T0 + 10 * SEC, T0, {0: PEER_GONE})
    still = decide(_restartable(status=held.status), {1: Observed(True)}, T0 + 14 * SEC, T0)
    assert still.stop == [] and still.status.restarts == 0
    late = decide(_restartable(status=held.status), {1: Observed(True)}, T0 + 15 * SEC, T0)
    assert late.status.restarts == 1 and "node 0 exited with code 1" in late.events[-1].message
    # both seen in one pass: the node that did not merely lose a peer is named, whatever
    # its index
    both = {0: Observed(False, exit_code=1), 1: Observed(False, exit_code=-9, signal=9)}
    plan = decide(_restartable(), both, T0 + 10 * SEC, T0, {0: PEER_GONE})
    assert "node 1 killed by SIGKILL" in plan.events[-1].message


def test_the_backoff_doubles_up_to_its_cap():
    from service.reconciler import backoff_s

    policy = pb.RestartPolicy(max_restarts=9, backoff_seconds=2, max_backoff_seconds=10)
    assert [backoff_s(policy, k) for k in (1, 2, 3, 4)] == [2, 4, 8, 10]


def test_the_restarted_world_reports_where_it_resumed_and_what_was_lost():
    recovering = _running(step=30, generation=1)
    recovering.recovery.failed_time.FromNanoseconds(T0 + 10 * SEC)
    recovering.recovery.failed_step = 30
    recovering.recovery.attempt = 1
    stale = {"step": 31, "generation": 0, "loss": 9.0}  # the dead world's lease lingers
    plan = decide(_restartable(status=recovering, ranks={0: stale}), {}, T0 + 20 * SEC, T0)
    assert plan.status.HasField("recovery") and plan.events == []
    report = {"step": 21, "generation": 1, "loss": 2.0, "total_steps": 50}
    report |= {"resumed_step": 20, "resumed_from": "/c/step-00000020"}
    view = _restartable(status=recovering, ranks={0: report})
    plan = decide(view, {}, T0 + 22 * SEC, T0, last_progress_ns=T0 + 21 * SEC)
    resumed = next(e for e in plan.events if e.type == "resumed")
    assert resumed.message == (
        "resumed from step 20 (/c/step-00000020); 10 step(s) lost; recovered in 12.0 s"
    )
    assert resumed.details["steps_lost"] == "10"
    assert not plan.status.HasField("recovery") and plan.status.step == 21


def test_past_the_budget_the_job_fails_naming_node_exit_code_and_log_line():
    exhausted = _running(step=30, restarts=2)
    observed = {0: Observed(False, exit_code=1), 1: Observed(running=True)}
    lines = {0: "megamoe: error: boom"}
    plan = decide(_restartable(status=exhausted), observed, T0, T0, lines)
    assert plan.status.state == pb.FAILED and sorted(plan.stop) == [0, 1]
    assert plan.status.message.startswith("node 0 exited with code 1: megamoe: error: boom")
    assert "after 2 restart(s)" in plan.status.message


def test_a_world_that_dies_while_restoring_rules_its_checkpoint_out():
    recovering = _running(step=30, generation=1, restarts=1)
    recovering.recovery.attempt = 1
    restoring = {"path": "/c/step-00000020", "commit": "/c/step-00000020@1.5", "generation": 1}
    observed = {0: Observed(False, exit_code=1), 1: Observed(False, exit_code=1)}
    view = _restartable(status=recovering, restoring=restoring)
    plan = decide(view, observed, T0, T0)
    assert list(plan.status.skipped_checkpoints) == ["/c/step-00000020@1.5"]
    assert "checkpoint_skipped" in [e.type for e in plan.events]
    # a world that trained before it died keeps its checkpoint
    trained = _restartable(status=recovering, restoring=restoring, ranks={0: {"generation": 1}})
    assert not decide(trained, observed, T0, T0).status.skipped_checkpoints


def test_cancel_while_backing_off_cancels_without_starting():
    recovering = _running(restarts=1)
    for node in recovering.nodes:
        node.state = pb.NODE_STOPPED
    recovering.recovery.restart_time.FromNanoseconds(T0)
    plan = decide(_restartable(status=recovering, cancel=True), {}, T0 + SEC, T0)
    assert plan.start == [] and plan.status.state == pb.CANCELLED


def test_a_dead_worlds_last_report_does_not_count_as_the_restart_resuming():
    """Between the failure and the restart the old world's rank 0 record may linger
    (its lease has not lapsed): the job must still restart, not call itself resumed."""
    observed = {0: Observed(running=True), 1: Observed(False, exit_code=1)}
    lingering = {0: {"step": 33, "generation": 0, "loss": 2.0}}
    failed = decide(_restartable(ranks=lingering), observed, T0, T0)
    assert failed.status.HasField("recovery")
    due = failed.status.recovery.restart_time.ToNanoseconds()
    plan = decide(_restartable(status=failed.status, ranks=lingering), {}, due, T0)
    assert plan.start == [0, 1] and "resumed" not in [e.type for e in plan.events]
    assert plan.status.HasField("recovery") and plan.status.generation == 1


def test_a_hung_world_is_named_and_restarted():
    hung = {"seconds": 12.0, "timeout": 10.0, "pending": 41, "waiting": [0]}
    hung["behind"] = [(1, 1, "ep_dispatch")]
    plan = decide(_restartable(), {}, T0, T0, hung=hung)
    event = next(e for e in plan.events if e.type == "hang")
    assert "rank 1 on node 1 (last entered: ep_dispatch) did not reach collective #41" in (
        event.message
    )
    assert event.details["ranks"] == "1" and event.node == 1
    assert plan.stop == [0, 1] and plan.status.HasField("recovery")
    assert plan.status.nodes[1].restarts == 1 and plan.status.nodes[0].restarts == 0


def test_a_node_waiting_to_be_scheduled_says_why_until_it_runs():
    reason = "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    observed = {0: Observed(running=True), 1: Observed(running=True, reason=reason)}
    plan = decide(_view(2, _running()), observed, T0 + SEC, T0)
    assert plan.stop == [] and plan.status.state == pb.RUNNING
    assert plan.status.nodes[1].message == f"waiting: {reason}"
    assert plan.status.message == f"node 1 waiting: {reason}"
    placed = decide(_view(2, plan.status), {0: Observed(True), 1: Observed(True)}, T0 + 2 * SEC, T0)
    assert placed.status.nodes[1].message == "" and placed.status.message == ""

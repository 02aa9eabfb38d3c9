"""The reconciler: it moves every job PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED.

Two halves. ``decide`` is pure: from what etcd holds about a job (``JobView``)
and what the executor sees of its nodes, it returns the next status, the nodes
to start and stop, and the events that tell what happened. ``Reconciler`` does
the effects: it polls the executor, stops and starts nodes, and commits the new
status together with the events in one etcd transaction that fails if anyone
else moved the job meanwhile (see ``JobStore.commit``). Nothing is kept in
memory that matters: a restarted reconciler reads the same etcd, polls the
same nodes (the local executor finds its nodes by pid and exit file) and goes on.

Events carry the job's state before the change, except the last event of a
change of state, which carries the new state: a watcher stops at the first
event in a terminal state and has seen everything.

Progress events: the workers' progress lands in the status continuously
(GetJob), and as a ``progress`` event at most every ``progress_interval``
seconds, which grows with the run's age (one per 1/1000 of the elapsed time, at
least every 5 s), so a month-long run stays at a few thousand events.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.executor import Executor, NodeHandle, Observed
from service.spec import validate_spec
from service.store import JobStore, JobView
from service.stragglers import THRESHOLD as STRAGGLER_THRESHOLD
from service.stragglers import Windows
from trainer.errors import EtcdUnavailable, MegamoeError

log = logging.getLogger("megamoe.reconciler")

TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
TICK_S = 0.5
STOP_GRACE_S = 10.0
MIN_PROGRESS_EVERY_S = 5.0
MAX_NODE_EVENTS = 32  # per commit; more are summed up in one event (etcd caps a transaction)
PEER_LOSS_WAIT_S = 5.0  # the longest a restart waits for the node that failed first
# A rank's error when a peer's connection broke (gloo, NCCL, the TCP store): the ranks that
# see it are victims of another node's failure.
PEER_LOSS = re.compile(
    r"closed by peer|reset by peer|remote worker crash|remote process exited|"
    r"communicator was aborted|Broken pipe",
    re.IGNORECASE,
)


def progress_interval(elapsed_s: float) -> float:
    return max(MIN_PROGRESS_EVERY_S, elapsed_s / 1000.0)


@dataclass
class Plan:
    status: pb.JobStatus
    start: list[int] = field(default_factory=list)
    stop: list[int] = field(default_factory=list)
    events: list[pb.JobEvent] = field(default_factory=list)

    def changed(self, before: pb.JobStatus | None) -> bool:
        return bool(self.start or self.stop or self.events) or before != self.status


def _event(kind: str, message: str, state: int, node: int = -1, **details) -> pb.JobEvent:
    return pb.JobEvent(
        type=kind,
        message=message,
        state=state,
        node=node,
        details={k: str(v) for k, v in details.items()},
    )


def decide(
    view: JobView,
    observed: dict[int, Observed],
    now_ns: int,
    created_ns: int,
    failure_lines: dict[int, str] | None = None,
    last_progress_ns: int = 0,
    stragglers: dict[int, tuple[float, int]] | None = None,
    hung: dict | None = None,
) -> Plan:
    """The next step of one job (see the module doc). ``observed``: the executor's view
    of each node the status says is running; ``failure_lines``: the log line that says why
    nodes that exited; ``stragglers``: ranks newly scored past the threshold, as
    rank -> (score, node); ``hung``: set when the world made no step progress for the
    job's hang timeout (seconds, timeout, the ranks behind and the ranks waiting)."""
    failure_lines = failure_lines or {}
    spec = view.spec
    if view.status is None:
        status = pb.JobStatus(state=pb.PENDING, message="starting")
        status.create_time.FromNanoseconds(created_ns)
        for k in range(spec.num_nodes):
            status.nodes.add(index=k, state=pb.NODE_PENDING)
        world = spec.num_nodes * spec.procs_per_node
        plan = Plan(status)
        plan.events.append(
            _event(
                "created",
                f"{spec.num_nodes} node(s) x {spec.procs_per_node} process(es), world {world}",
                pb.PENDING,
            )
        )
    else:
        status = pb.JobStatus()
        status.CopyFrom(view.status)
        plan = Plan(status)
    if status.state in TERMINAL:
        return plan
    old = status.state
    _fold_progress(plan, view, now_ns, last_progress_ns)
    running = [n for n in status.nodes if n.state == pb.NODE_RUNNING]

    if view.cancel:
        for node in running:
            node.state, node.message = pb.NODE_STOPPED, "stopped by cancel"
            plan.stop.append(node.index)
        return _finish(plan, pb.CANCELLED, "cancelled", now_ns)

    if status.state == pb.PENDING:
        plan.start = [n.index for n in status.nodes]
        for node in status.nodes:
            node.state = pb.NODE_RUNNING
        status.start_time.FromNanoseconds(now_ns)
        status.state, status.message = pb.RUNNING, ""
        plan.events.append(
            _event("state", f"started {len(plan.start)} node(s)", pb.RUNNING, nodes=len(plan.start))
        )
        return plan

    if status.HasField("recovery") and not running:
        if now_ns >= status.recovery.restart_time.ToNanoseconds():
            _restart(plan)
        return plan

    failed = []
    for node in running:
        seen = observed.get(node.index)
        if seen is not None and seen.running:
            _note_waiting(status, node, seen.reason)
        if seen is None or seen.running:
            continue
        node.exit_code = seen.exit_code or 0
        node.signal = seen.signal or 0
        node.end_time.FromNanoseconds(now_ns)
        if seen.exit_code == 0 and not seen.lost:
            node.state, node.message = pb.NODE_SUCCEEDED, "exited with code 0"
        else:
            node.state = pb.NODE_FAILED
            line = failure_lines.get(node.index, "")
            node.message = seen.describe() + (f": {line}" if line else "")
            failed.append(node)
        if len([e for e in plan.events if e.type == "node_exited"]) < MAX_NODE_EVENTS:
            plan.events.append(
                _event(
                    "node_exited",
                    f"node {node.index} {node.message}",
                    old,
                    node.index,
                    exit_code=node.exit_code,
                    signal=node.signal,
                )
            )

    failed = [n for n in status.nodes if n.state == pb.NODE_FAILED]  # this world's, so far
    if failed:
        if _await_cause(status, failed, now_ns):
            return plan
        first = min(failed, key=_cause_rank)
        for node in status.nodes:
            if node.state == pb.NODE_RUNNING:
                node.state, node.message = pb.NODE_STOPPED, f"stopped: node {first.index} failed"
                plan.stop.append(node.index)
        reason = f"node {first.index} {first.message}"
        plan.stop += [n.index for n in failed]  # what the node left behind (orphaned workers)
        if status.restarts < spec.restart.max_restarts:
            _plan_restart(plan, view, failed, reason, now_ns)
            return plan
        if status.restarts:
            reason += f" (after {status.restarts} restart(s), the most the spec allows)"
        return _finish(plan, pb.FAILED, reason, now_ns)

    if hung and running:
        return _hang(plan, view, hung, now_ns)

    if stragglers and running and spec.straggler != pb.STRAGGLER_OFF:
        replace = spec.straggler == pb.STRAGGLER_REPLACE
        for rank, (score, node) in sorted(stragglers.items()):
            action = "replacing its node" if replace else "reported"
            plan.events.append(
                _event(
                    "straggler",
                    f"rank {rank} on node {node} is a straggler: its compute time scores "
                    f"{score:.1f} against the other ranks' (threshold {STRAGGLER_THRESHOLD:g}); "
                    + action,
                    status.state,
                    node,
                    rank=rank,
                    score=f"{score:.3f}",
                    step=status.step,
                )
            )
        if replace:
            rank, (score, node) = max(stragglers.items(), key=lambda kv: kv[1][0])
            slow = [n for n in status.nodes if n.index == node]
            for n in status.nodes:
                if n.state == pb.NODE_RUNNING:
                    n.state = pb.NODE_STOPPED
                    n.message = f"stopped: rank {rank} on node {node} is a straggler"
                    plan.stop.append(n.index)
            reason = f"rank {rank} on node {node} is a straggler (score {score:.1f})"
            if status.restarts < spec.restart.max_restarts:
                _plan_restart(plan, view, slow, reason, now_ns)
                return plan
            return _finish(plan, pb.FAILED, reason + "; no restart left to replace it", now_ns)

    if not any(n.state == pb.NODE_RUNNING for n in status.nodes) and not (
        status.HasField("recovery") or all(n.state == pb.NODE_SUCCEEDED for n in status.nodes)
    ):  # cannot happen by the rules above; if it did, the job would wait forever
        return _finish(plan, pb.FAILED, "no node of the job runs and none will start", now_ns)

    if all(n.state == pb.NODE_SUCCEEDED for n in status.nodes):
        result = view.result or {}
        if result.get("final_loss") is not None:
            status.final_loss = float(result["final_loss"])
            status.last_loss = status.final_loss
        status.summary_path = result.get("summary_path", "")
        for name, key in (("step", "steps"), ("tokens", "tokens")):
            if key in result:
                setattr(status, name, int(result[key]))
        if not result:
            message = "succeeded; the workers' final report did not reach etcd"
        else:
            message = f"succeeded: final loss {status.final_loss:.4f}"
        return _finish(plan, pb.SUCCEEDED, message, now_ns)
    return plan


def _lost_a_peer(node: pb.NodeStatus) -> bool:
    """The node's ranks failed because a peer's connection went, not by themselves."""
    return bool(PEER_LOSS.search(node.message)) and "megamoe: error" not in node.message


def _cause_rank(node: pb.NodeStatus) -> tuple:
    """Which failed node names the job's failure: the one whose log says why (megamoe's own
    error), then any other failure, then one that only lost a peer; the first to go."""
    return ("megamoe: error" not in node.message, _lost_a_peer(node), node.end_time.ToNanoseconds())


def _await_cause(status: pb.JobStatus, failed: list, now_ns: int) -> bool:
    """Hold the decision while every failed node only lost a peer and others still run:
    the node that failed first is usually a moment behind (its agent notices its dead
    worker after the peers' connections broke), and the restart's reason should name it.
    At most ``PEER_LOSS_WAIT_S`` after the first of them went."""
    if not all(_lost_a_peer(n) for n in failed):
        return False
    if not any(n.state == pb.NODE_RUNNING for n in status.nodes):
        return False
    first_ns = min(n.end_time.ToNanoseconds() for n in failed)
    if now_ns - first_ns >= PEER_LOSS_WAIT_S * 1e9:
        return False
    nodes = ", ".join(str(n.index) for n in failed)
    status.message = f"node(s) {nodes} lost a peer; waiting for the node that failed first"
    return True


def _hang(plan: Plan, view: JobView, hung: dict, now_ns: int) -> Plan:
    """No step progress for the hang timeout: name who is behind, restart (or fail)."""
    status = plan.status
    behind, waiting = hung["behind"], hung["waiting"]
    if behind:
        who = ", ".join(
            f"rank {r} on node {n} (last entered: {op or 'none'})" for r, n, op in behind
        )
        what = f"{who} did not reach collective #{hung['pending']} that rank(s) "
        what += f"{', '.join(str(r) for r in waiting)} wait in"
    else:
        what = "no rank reported which collective it is in"
    reason = f"hung: no step progress for {hung['seconds']:.0f} s (timeout {hung['timeout']:g} s)"
    plan.events.append(
        _event(
            "hang",
            f"{reason}: {what}",
            status.state,
            behind[0][1] if behind else -1,
            ranks=",".join(str(r) for r, _, _ in behind),
            nodes=",".join(str(n) for _, n, _ in behind),
            step=status.step,
        )
    )
    stuck_nodes = {n for _, n, _ in behind}
    for node in status.nodes:
        if node.state == pb.NODE_RUNNING:
            node.state = pb.NODE_STOPPED
            node.message = "stopped: the job hung"
            plan.stop.append(node.index)
    culprits = [n for n in status.nodes if n.index in stuck_nodes]
    reason = f"{reason}: {what}"
    if status.restarts < view.spec.restart.max_restarts:
        _plan_restart(plan, view, culprits, reason, now_ns)
        return plan
    return _finish(plan, pb.FAILED, reason, now_ns)


def backoff_s(policy: pb.RestartPolicy, attempt: int) -> float:
    """Seconds before restart ``attempt`` (1, 2, ...): the backoff, doubled after each,
    capped by max_backoff_seconds (when set)."""
    seconds = policy.backoff_seconds * 2 ** (attempt - 1)
    return min(seconds, policy.max_backoff_seconds) if policy.max_backoff_seconds else seconds


def _plan_restart(plan: Plan, view: JobView, failed: list, reason: str, now_ns: int) -> None:
    """A failure within the restart budget: the world is stopped (plan.stop) and starts
    again after the backoff, from the newest committed checkpoint."""
    status, policy = plan.status, view.spec.restart
    if _restore_failed(view, status):
        # this world died before it trained a step: its checkpoint is ruled out
        commit = view.restoring["commit"]
        if commit not in status.skipped_checkpoints:
            status.skipped_checkpoints.append(commit)
            plan.events.append(
                _event(
                    "checkpoint_skipped",
                    f"the restore from {view.restoring['path']} failed; the next start "
                    "falls back to the checkpoint before it",
                    status.state,
                    path=view.restoring["path"],
                )
            )
    attempt = status.restarts + 1
    wait = backoff_s(policy, attempt)
    if not status.HasField("recovery"):  # the first failure: where recovery is measured from
        status.recovery.failed_time.FromNanoseconds(now_ns)
        status.recovery.failed_step = status.step
    status.recovery.attempt = attempt
    status.recovery.restart_time.FromNanoseconds(now_ns + int(wait * 1e9))
    status.recovery.reason = reason
    status.restarts = attempt
    for node in failed:
        node.restarts += 1
    status.message = f"restarting (attempt {attempt} of {policy.max_restarts}): {reason}"
    plan.events.append(
        _event(
            "restarting",
            f"restarting the job's world (attempt {attempt} of {policy.max_restarts}) "
            f"in {wait:g} s: {reason}",
            status.state,
            attempt=attempt,
            max_restarts=policy.max_restarts,
            backoff_s=f"{wait:g}",
        )
    )


def _restore_failed(view: JobView, status: pb.JobStatus) -> bool:
    """The current world began to load a checkpoint and died before reporting a step."""
    restoring = view.restoring
    if not restoring or restoring.get("generation") != status.generation:
        return False
    report = view.ranks.get(0)
    return not (report and report.get("generation") == status.generation)


def _restart(plan: Plan) -> None:
    """Start every node again as the next generation of the world."""
    status = plan.status
    status.generation += 1
    plan.start = [n.index for n in status.nodes]
    for node in status.nodes:
        node.state, node.exit_code, node.signal = pb.NODE_RUNNING, 0, 0
        node.message = f"restarted (attempt {status.recovery.attempt})"
    status.message = f"restarted (attempt {status.recovery.attempt}), resuming"
    plan.events.append(
        _event(
            "restarted",
            f"started generation {status.generation} of the world",
            status.state,
            generation=status.generation,
            attempt=status.recovery.attempt,
        )
    )


def _fold_progress(plan: Plan, view: JobView, now_ns: int, last_progress_ns: int) -> None:
    """Rank 0's report and the newest checkpoint into the status (and events). Only reports
    of the current world count: a dead world's lease may not have lapsed yet."""
    status = plan.status
    report = view.ranks.get(0)
    if report and report.get("generation", 0) != status.generation:
        report = None
    if status.HasField("recovery") and not any(n.state == pb.NODE_RUNNING for n in status.nodes):
        report = None  # stopped, not yet restarted: a report can only be the dead world's
    if report and status.HasField("recovery") and report.get("step", 0) > 0:
        _resumed(plan, report, now_ns)
        status.step = 0  # the restarted world's steps replace the lost ones
    if report and report.get("step", 0) > status.step:
        status.step = int(report["step"])
        status.total_steps = int(report.get("total_steps", 0))
        status.tokens = int(report.get("tokens", 0))
        status.last_loss = float(report.get("loss", 0.0))
        status.tokens_per_second = float(report.get("tokens_per_s", 0.0))
        status.mfu = float(report.get("mfu", 0.0))
        started = status.start_time.ToNanoseconds() or now_ns
        due = last_progress_ns + progress_interval((now_ns - started) / 1e9) * 1e9
        if now_ns >= due:
            plan.events.append(
                _event(
                    "progress",
                    progress_line(status),
                    status.state,
                    step=status.step,
                    total_steps=status.total_steps,
                    loss=f"{status.last_loss:.6g}",
                    tokens_per_s=f"{status.tokens_per_second:.6g}",
                    mfu=f"{status.mfu:.6g}",
                )
            )
    ckpt = view.checkpoint or {}
    # every commit since the last look, oldest first (the key lists the recent ones)
    for step, path in sorted(
        ckpt.get("commits") or ([[ckpt["step"], ckpt["path"]]] if ckpt else [])
    ):
        if int(step) <= status.last_checkpoint_step:
            continue
        status.last_checkpoint_step, status.last_checkpoint = int(step), str(path)
        plan.events.append(
            _event(
                "checkpoint",
                f"checkpoint of step {step} committed: {path}",
                status.state,
                step=step,
                path=path,
            )
        )


def _resumed(plan: Plan, report: dict, now_ns: int) -> None:
    """The restarted world trains: say from where, what was lost, how long it took."""
    status, recovery = plan.status, plan.status.recovery
    resumed = int(report.get("resumed_step") or 0)
    path = report.get("resumed_from") or ""
    lost = max(0, recovery.failed_step - resumed)
    took = (now_ns - recovery.failed_time.ToNanoseconds()) / 1e9
    start = f"resumed from step {resumed} ({path})" if path else "started over from step 0"
    plan.events.append(
        _event(
            "resumed",
            f"{start}; {lost} step(s) lost; recovered in {took:.1f} s",
            status.state,
            resumed_step=resumed,
            path=path,
            steps_lost=lost,
            recovery_s=f"{took:.3f}",
            attempt=recovery.attempt,
        )
    )
    status.ClearField("recovery")
    status.message = ""


def progress_line(status: pb.JobStatus) -> str:
    """step, loss, tokens/s, MFU and ETA of a status, as one line."""
    text = f"step {status.step}/{status.total_steps} | loss {status.last_loss:.4f}"
    text += f" | {status.tokens_per_second / 1e3:.2f}k tok/s | MFU {100 * status.mfu:.2f}%"
    if status.tokens_per_second > 0 and status.step and status.total_steps > status.step:
        per_step = status.tokens / status.step
        eta = (status.total_steps - status.step) * per_step / status.tokens_per_second
        text += f" | ETA {_duration(eta)}"
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _finish(plan: Plan, state: int, message: str, now_ns: int) -> Plan:
    plan.status.state, plan.status.message = state, message
    plan.status.end_time.FromNanoseconds(now_ns)
    plan.events.append(_event("state", message, state))
    return plan


WAITING = "waiting: "


def _note_waiting(status: pb.JobStatus, node: pb.NodeStatus, reason: str) -> None:
    """A node that runs but waits for something outside the job (a pod the scheduler cannot
    place) says so in its message, and in the job's while no step has been reported."""
    if reason:
        node.message = f"{WAITING}{reason}"
    elif node.message.startswith(WAITING):
        node.message = ""
    if status.step:
        return
    waiting = [n for n in status.nodes if n.message.startswith(WAITING)]
    if waiting:
        status.message = f"node {waiting[0].index} {waiting[0].message}"
    elif WAITING in status.message:
        status.message = ""


def record_started(plan: Plan, handles: dict[int, NodeHandle]) -> None:
    """Put the started nodes' pids or pods into the plan's status and its start event."""
    for node in plan.status.nodes:
        handle = handles.get(node.index)
        if handle is not None:
            node.pid, node.pod = handle.pid, handle.pod
    where = ", ".join(
        f"node {k}: {'pod ' + h.pod if h.pod else 'pid ' + str(h.pid)}"
        for k, h in sorted(handles.items())
    )
    for event in plan.events:
        if (event.type, event.state) in (("state", pb.RUNNING), ("restarted", pb.RUNNING)):
            event.message += f" ({where})"


class Reconciler:
    """Drives every unfinished job on a thread (``start``/``stop``), or one pass (``tick``)."""

    def __init__(
        self,
        store: JobStore,
        executor: Executor,
        tick_s: float = TICK_S,
        grace_s: float = STOP_GRACE_S,
        clock: Callable[[], int] = time.time_ns,
        metrics=None,
    ) -> None:
        self.store, self.executor = store, executor
        self.metrics = metrics  # service.metrics.ServeMetrics, or None
        self._started_ns: dict[str, int] = {}  # job -> when its world last started
        self._windows: dict[str, Windows] = {}  # job -> its ranks' compute times
        self._flagged: dict[str, set[int]] = {}  # job -> ranks already reported as stragglers
        self._moved: dict[str, tuple[int, int, int]] = {}  # job -> (generation, step, when)
        self._hang_timeout: dict[str, float] = {}  # job -> observe.hang_timeout_s
        self.tick_s, self.grace_s, self.clock = tick_s, grace_s, clock
        self._last_progress: dict[str, int] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._etcd_down = False

    def start(self) -> None:
        self.adopt()
        self._thread = threading.Thread(target=self._run, name="megamoe-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.tick_s):
            self.tick()

    def adopt(self) -> None:
        """Take over the running nodes of jobs an earlier control plane started."""
        try:
            entries = [e for e in self.store.index() if e.state == pb.RUNNING]
        except EtcdUnavailable as exc:
            log.warning("cannot adopt running jobs yet: %s", exc)
            return
        for entry in entries:
            view = self.store.view(entry.job_id)
            if view is None or view.status is None:
                continue
            for node in view.status.nodes:
                if node.state == pb.NODE_RUNNING:
                    handle = NodeHandle(node.pid, node.pod)
                    alive = self.executor.adopt(entry.job_id, node.index, handle)
                    log.info(
                        "job %s node %d (%s): %s",
                        entry.job_id,
                        node.index,
                        node.pod or node.pid,
                        "adopted" if alive else "no longer running",
                    )

    def tick(self) -> None:
        """One pass over every unfinished job."""
        try:
            entries = [e for e in self.store.index() if e.state not in TERMINAL]
        except EtcdUnavailable as exc:
            if not self._etcd_down:
                log.warning("reconciler paused, etcd unreachable: %s", exc)
            self._etcd_down = True
            return
        if self._etcd_down:
            log.warning("etcd reachable again, reconciling")
            self._etcd_down = False
        for entry in entries:
            try:
                self.reconcile(entry.job_id, entry.created_ns)
            except EtcdUnavailable as exc:
                log.warning("job %s: etcd unreachable, retrying: %s", entry.job_id, exc)
                return
            except Exception:  # one broken job must not stop the others
                log.exception("job %s: reconcile failed", entry.job_id)

    def reconcile(self, job_id: str, created_ns: int) -> None:
        view = self.store.view(job_id)
        if view is None:
            return
        observed: dict[int, Observed] = {}
        failure_lines: dict[int, str] = {}
        if view.status is not None:
            for node in view.status.nodes:
                if node.state == pb.NODE_RUNNING:
                    seen = self.executor.poll(job_id, node.index, NodeHandle(node.pid, node.pod))
                    observed[node.index] = seen
                    if not seen.running and seen.exit_code != 0:
                        failure_lines[node.index] = self.executor.failure_line(job_id, node.index)
        now = self.clock()
        stragglers = self._stragglers(job_id, view)
        hung = self._hung(job_id, view, now)
        plan = decide(
            view,
            observed,
            now,
            created_ns,
            failure_lines,
            self._last_progress.get(job_id, 0),
            stragglers,
            hung,
        )
        if not plan.changed(view.status):
            return
        for k in plan.stop:
            node = plan.status.nodes[k]
            self.executor.stop_node(job_id, k, NodeHandle(node.pid, node.pod), self.grace_s)
        handles: dict[int, NodeHandle] = {}
        if plan.start:
            try:
                validate_spec(view.spec)  # stored specs were valid; a newer server may differ
                status = plan.status
                skip = list(status.skipped_checkpoints)
                for k in plan.start:
                    handles[k] = self.executor.start_node(
                        job_id, view.spec, k, status.generation, skip
                    )
            except (MegamoeError, OSError) as exc:
                self._abort_start(job_id, plan, handles, exc, now)
            else:
                record_started(plan, handles)
        if any(e.type == "progress" for e in plan.events):
            self._last_progress[job_id] = now
        if not self.store.commit(view, plan.status, plan.events):
            log.warning("job %s moved on while reconciling; trying again", job_id)
            for k, handle in handles.items():  # what we started is not on record
                self.executor.stop_node(job_id, k, handle, self.grace_s)
            return
        if plan.status.state in TERMINAL:
            try:
                self.executor.finish_job(job_id)
            except (MegamoeError, OSError) as exc:  # the job's result is committed already
                log.warning("job %s: freeing its resources failed: %s", job_id, exc)
        for event in plan.events:
            if event.type != "progress":
                log.info("job %s: %s", job_id, event.message)
            if event.type == "straggler":
                self._flagged.setdefault(job_id, set()).add(int(event.details["rank"]))
            elif event.type == "restarted":  # a new world: new ranks, new samples
                self._windows.pop(job_id, None)
                self._flagged.pop(job_id, None)
        self._measure(job_id, view, plan, now)

    def _hung(self, job_id: str, view: JobView, now: int) -> dict | None:
        """The world's state when it made no step progress for the job's hang timeout."""
        status = view.status
        running = status is not None and any(n.state == pb.NODE_RUNNING for n in status.nodes)
        if not running or status.state != pb.RUNNING or status.HasField("recovery"):
            self._moved.pop(job_id, None)
            return None
        mark = (status.generation, status.step)
        seen = self._moved.get(job_id)
        if seen is None or seen[:2] != mark:
            self._moved[job_id] = (*mark, now)
            return None
        if job_id not in self._hang_timeout:
            self._hang_timeout[job_id] = validate_spec(view.spec).observe.hang_timeout_s
        timeout = self._hang_timeout[job_id]
        stalled = (now - seen[2]) / 1e9
        if not timeout or stalled < timeout:
            return None
        entered = {
            r: (int(rep.get("collectives", 0)), int(rep.get("node", 0)), rep.get("last_op", ""))
            for r, rep in view.ranks.items()
            if rep.get("generation", 0) == status.generation
        }
        top = max((c for c, _, _ in entered.values()), default=0)
        behind = [(r, n, op) for r, (c, n, op) in entered.items() if c < top]
        world = view.spec.num_nodes * view.spec.procs_per_node
        per_node = view.spec.procs_per_node
        # a rank with no report at all is behind too (its node: torchrun's rank order)
        behind += [(r, r // per_node, "") for r in range(world) if r not in entered]
        return {
            "seconds": stalled,
            "timeout": timeout,
            "pending": top,
            "waiting": sorted(r for r, (c, _, _) in entered.items() if c == top),
            "behind": sorted(behind),
        }

    def _stragglers(self, job_id: str, view: JobView) -> dict[int, tuple[float, int]]:
        """Score the current world's ranks (exported as megamoe_straggler_score); returns the
        ranks past the threshold not flagged before, as rank -> (score, node)."""
        status = view.status
        if status is None or status.state != pb.RUNNING or status.HasField("recovery"):
            return {}
        windows = self._windows.setdefault(job_id, Windows())
        nodes = {}
        for rank, report in view.ranks.items():
            if report.get("generation", 0) != status.generation or "compute_s" not in report:
                continue
            windows.add(rank, int(report.get("step", 0)), float(report["compute_s"]))
            nodes[rank] = int(report.get("node", 0))
        flagged = self._flagged.setdefault(job_id, set())
        fresh = {}
        for rank, score in windows.scores().items():
            if self.metrics is not None:
                self.metrics.straggler_score.labels(
                    job_id=job_id, rank=str(rank), node=str(nodes.get(rank, 0))
                ).set(score)
            if score >= STRAGGLER_THRESHOLD and rank not in flagged:
                fresh[rank] = (score, nodes.get(rank, 0))
        return fresh

    def _measure(self, job_id: str, view: JobView, plan: Plan, now: int) -> None:
        """Restarts, recovery and rendezvous durations from a committed plan."""
        if self.metrics is None:
            return
        for event in plan.events:
            if event.type == "restarting":
                self.metrics.job_restarts.labels(job_id=job_id).inc()
            elif event.type == "resumed":
                self.metrics.recovery_seconds.observe(float(event.details["recovery_s"]))
            elif (event.type, event.state) in (("state", pb.RUNNING), ("restarted", pb.RUNNING)):
                self._started_ns[job_id] = now
        before = view.status.step if view.status is not None else 0
        started = self._started_ns.get(job_id)
        first_step = plan.status.step > 0 and (before == 0 or plan.status.step < before)
        if started is not None and first_step:
            self.metrics.rendezvous_seconds.observe((now - started) / 1e9)
            del self._started_ns[job_id]
        if plan.status.state in TERMINAL:
            self._started_ns.pop(job_id, None)

    def _abort_start(
        self, job_id: str, plan: Plan, handles: dict[int, NodeHandle], exc: Exception, now: int
    ) -> None:
        for k, handle in handles.items():
            self.executor.stop_node(job_id, k, handle, self.grace_s)
        record_started(plan, handles)
        plan.events = [e for e in plan.events if e.type not in ("state", "restarted")]
        for node in plan.status.nodes:
            node.state = pb.NODE_FAILED if node.index not in handles else pb.NODE_STOPPED
        _finish(plan, pb.FAILED, f"could not start the job's nodes: {exc}", now)

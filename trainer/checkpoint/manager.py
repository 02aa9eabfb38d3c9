"""Saving during training and restoring at start-up.

A save (every ``checkpoint.interval`` steps) blocks the training loop only to
copy this rank's shard to host memory (pinned on GPU); DCP's ``async_save``
then writes it on a background thread while training goes on, over a gloo
group of its own (``ParallelDims.checkpoint_group``), so its collectives never
interleave with the training's. At most one save is in flight: when the next
one is due first, the step waits for it and the wait is booked as blocked
time. When DCP reports the save complete on rank 0 - the coordinator, which
writes DCP's ``.metadata`` only after every rank's files are written - rank 0
checksums the files, writes the manifest (the commit) and prunes old
checkpoints. A save that fails (no space, an I/O error) is reported in one
warning line, leaves nothing committed, and training goes on.

``resolve`` picks what to resume from before any rank starts; ``restore`` loads
it into the live model and optimizer of whatever layout this run has.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Collection
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint import store
from trainer.checkpoint.boxes import Boxes, BoxLoadPlanner, BoxSavePlanner
from trainer.checkpoint.state import (
    adam_steps,
    load_targets,
    rng_state,
    set_rng_state,
    tensor_views,
)
from trainer.config import Config
from trainer.errors import CheckpointError, ConfigError
from trainer.runtime import Progress

# A one-process run saves and loads with no process group on purpose (no_dist=True);
# DCP warns about exactly that on every call, from its writer thread too.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

# DCP reports a failed write on any rank as CheckpointException, a BaseException.
SAVE_ERRORS = (Exception, CheckpointException)


def reference_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Logical shape of every parameter of the configured model (built on the meta device)."""
    from trainer.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg.model, groups=cfg.parallel.n)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_shapes(path: str | Path, manifest: dict[str, Any], cfg: Config) -> None:
    """CheckpointError naming the first parameter whose saved shape differs from the model's."""
    saved = {k: tuple(v) for k, v in manifest.get("shapes", {}).items()}
    want = reference_shapes(cfg)
    for name, shape in want.items():
        if name not in saved:
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model: it has no parameter "
                f"{name} (shape {list(shape)})"
            )
        if saved[name] != shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model: parameter {name} is "
                f"{list(saved[name])} in the checkpoint but {list(shape)} in the model"
            )
    extra = sorted(set(saved) - set(want))
    if extra:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model: it has parameter {extra[0]} "
            f"(shape {list(saved[extra[0]])}), which the model lacks"
        )


def resolve(
    cfg: Config,
    resume: bool,
    resume_from: str | None,
    warn: Callable[[str], None],
    skip: Collection[str] = (),
) -> Path | None:
    """The checkpoint this run starts from, checked against the model, or None (fresh).
    ``skip``: commit ids (``store.commit_id``) ``--resume`` must pass over."""
    if resume_from:
        path = Path(resume_from)
        manifest = store.read_manifest(path)
        problem = store.verify(path, manifest)
        if problem:
            raise CheckpointError(f"checkpoint {path}: {problem}")
    elif resume:
        if not cfg.checkpoint.dir:
            raise ConfigError("--resume needs checkpoint.dir (where the checkpoints are)")
        entry = store.choose(cfg.checkpoint.dir, warn, skip)
        if entry is None:
            warn(f"no committed checkpoint in {cfg.checkpoint.dir}: starting fresh")
            return None
        path, manifest = entry.path, entry.manifest
    else:
        return None
    check_shapes(path, manifest, cfg)
    return path


class _AlreadyStaged:
    """DCP's stager hook: the state handed to ``async_save`` is a host copy already."""

    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.detach().clone()


class Checkpointer:
    """Saves this rank's state every ``checkpoint.interval`` steps (see the module doc)."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world: int,
        device: torch.device,
        group,
        layout: dict[str, Any],
        out: TextIO,
        on_commit: Callable[[int, str], None] | None = None,
        on_saved: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        c = cfg.checkpoint
        self.on_commit = on_commit  # (step, path) once a save is committed (rank 0)
        self.on_saved = on_saved  # (record with blocked_s, write_s) once this rank's save ended
        self.cfg, self.rank, self.world, self.device, self.group = cfg, rank, world, device, group
        self.root, self.interval, self.keep, self.keep_every = (
            c.dir,
            c.interval,
            c.keep,
            c.keep_every,
        )
        self.layout, self.out = layout, out
        self.shapes = {k: list(v) for k, v in reference_shapes(cfg).items()} if rank == 0 else {}
        self.saves: list[dict[str, Any]] = []
        self._inflight: tuple[threading.Event, dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        return bool(self.root and self.interval and step % self.interval == 0)

    def save(self, step: int, progress: Progress, model, optimizer) -> None:
        start = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - start
        staged = self._stage(progress, model, optimizer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        staging = time.perf_counter() - start - waited
        record = {
            "step": step,
            "path": str(store.step_dir(self.root, step)),
            "committed": False,
            "waited_s": waited,
            "staging_s": staging,
            "blocked_s": waited + staging,
        }
        self.saves.append(record)
        done = threading.Event()
        self._inflight = (done, record)
        fields = {"step": step, "tokens": progress.tokens, "adam_steps": adam_steps(optimizer)}
        try:
            future = dcp.async_save(
                staged,
                checkpoint_id=record["path"],
                planner=BoxSavePlanner(),
                process_group=self.group,
                async_stager=_AlreadyStaged(),
                no_dist=self.world == 1,
            )
        except SAVE_ERRORS as exc:  # an unwritable directory must not end the run
            self._failed(record, exc)
            done.set()
            return
        future.add_done_callback(lambda f: self._finished(f, record, fields, start, done))

    def _stage(self, progress: Progress, model, optimizer) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for key, value in tensor_views(model, optimizer).items():
            if isinstance(value, Boxes):
                state[key] = Boxes(value.shape, {o: _host_copy(t) for o, t in value.boxes.items()})
            else:
                state[key] = _host_copy(value)
        # One JSON string: DCP would flatten a dict into one entry per leaf.
        state["train.progress"] = json.dumps(
            {
                "step": progress.step,
                "tokens": progress.tokens,
                "skipped": progress.skipped,
                "sampler": progress.sampler,
            }
        )
        state["train.losses"] = torch.tensor(progress.losses, dtype=torch.float64)
        state["train.balance_losses"] = torch.tensor(progress.balance_losses, dtype=torch.float64)
        for name, t in rng_state(self.device).items():
            state[f"rng.rank{self.rank}.{name}"] = t.clone()
        return state

    def _finished(self, future: Future, record, fields, start: float, done) -> None:
        try:
            future.result()
            record["write_s"] = time.perf_counter() - start - record["blocked_s"]
            if self.rank == 0:
                path = Path(record["path"])
                _remove_stale_files(path)
                durations = {
                    k: record[k] for k in ("waited_s", "staging_s", "blocked_s", "write_s")
                }
                durations["total_s"] = time.perf_counter() - start
                store.commit(
                    path,
                    {
                        **fields,
                        "created_unix": time.time(),
                        "layout": self.layout,
                        "world": self.world,
                        "shapes": self.shapes,
                        "model_shape_hash": store.shape_hash(self.shapes),
                        "config": self.cfg.to_dict(),
                        "durations": durations,
                    },
                )
                record["committed"] = True
                record["total_s"] = durations["total_s"]
                store.prune(self.root, self.keep, self.keep_every, fields["step"])
                if self.on_commit:
                    self.on_commit(fields["step"], str(path.resolve()))
        except SAVE_ERRORS as exc:  # reported; nothing committed; training goes on
            self._failed(record, exc)
        finally:
            if self.on_saved and "write_s" in record:
                self.on_saved(record)
            done.set()

    def _failed(self, record: dict[str, Any], exc: BaseException) -> None:
        record["error"] = _one_line(exc)
        if self.rank == 0:
            print(
                f"warning: checkpoint {record['path']} failed, nothing committed, training "
                f"goes on: {record['error']}",
                file=self.out,
                flush=True,
            )

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed."""
        if self._inflight is not None:
            done, _ = self._inflight
            done.wait()
            self._inflight = None

    def summary(self) -> dict[str, Any]:
        return {
            "dir": self.root,
            "interval": self.interval,
            "saves": self.saves,
            "committed_steps": [s["step"] for s in self.saves if s["committed"]],
            "blocked_s": sum(s["blocked_s"] for s in self.saves),
        }


def _remove_stale_files(path: Path) -> None:
    """Delete files in a just-written checkpoint that this save did not write (a killed
    run's half-written save of the same step, perhaps by more ranks)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    ours = {info.relative_path for info in metadata.storage_data.values()} | {".metadata"}
    for f in path.iterdir():
        if f.is_file() and f.name not in ours:
            f.unlink()


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [type(exc).__name__])[-1][:300]


def restore(path: Path, cfg: Config, rank: int, world: int, device, group, model, optimizer):
    """Load checkpoint ``path`` into this rank's live state; returns the saved Progress."""
    manifest = store.read_manifest(path)
    reader = dcp.FileSystemReader(str(path))
    saved_keys = set(reader.read_metadata().state_dict_metadata)
    step = int(manifest["step"])
    state = load_targets(model, optimizer, int(manifest.get("adam_steps", 0)))
    state["train.progress"] = None
    state["train.losses"] = torch.empty(step, dtype=torch.float64)
    state["train.balance_losses"] = torch.empty(step, dtype=torch.float64)
    rng = {k: v.clone() for k, v in rng_state(device).items()}
    for name, t in rng.items():
        if f"rng.rank{rank}.{name}" in saved_keys:
            state[f"rng.rank{rank}.{name}"] = t
    dcp.load(
        state,
        storage_reader=reader,
        planner=BoxLoadPlanner(),
        process_group=group,
        no_dist=world == 1,
    )
    if any(k.startswith(f"rng.rank{rank}.") for k in state):
        set_rng_state(rng, device)
    p = json.loads(state["train.progress"])
    return Progress(
        step=p["step"],
        tokens=p["tokens"],
        skipped=p["skipped"],
        sampler=p["sampler"],
        losses=state["train.losses"].tolist(),
        balance_losses=state["train.balance_losses"].tolist(),
    )

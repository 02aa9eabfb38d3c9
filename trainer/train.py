"""The training loop: build the parts from a Config, run the steps, write the summary.

One optimizer step consumes ``train.global_batch`` sequences, split into
micro-batches of ``train.micro_batch`` (gradients accumulated); the loss is
the mean next-token cross entropy plus the device-level balance loss. AdamW
with linear warmup and cosine decay, global gradient-norm clipping, and a
skipped step (counted) when the gradient is not finite. ``train.dtype = bf16``
runs the forward under autocast with fp32 master weights.

This file wires and loops; the parts live in model/, data/ and observe/.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from trainer import hostmem
from trainer.atomic import write_json_atomic
from trainer.config import Config, TrainConfig
from trainer.data import BatchSampler, TokenData, batch_from_starts
from trainer.errors import ConfigError
from trainer.faults import Faults
from trainer.model import MoETransformer, flops_per_token, lm_loss, total_params
from trainer.model.flops import activated_gemm_params
from trainer.observe.mfu import peak_flops, use_tensor_cores
from trainer.observe.progress import RunLog, StepRecord
from trainer.optim import adamw
from trainer.parallel.ops import use_fused_kernels
from trainer.parallel.timing import Clock
from trainer.parallel.timing import seconds as step_seconds
from trainer.runtime import Progress, StepResult, Worker, pick_device


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then cosine."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_model(cfg: Config, device: torch.device) -> MoETransformer:
    """The reference model, initialised from train.seed (same weights on every layout)."""
    torch.manual_seed(cfg.train.seed)
    return MoETransformer(cfg.model, groups=cfg.parallel.n).to(device)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return adamw(groups, t.lr, (t.beta1, t.beta2))


def open_data(cfg: Config) -> TokenData:
    data = TokenData.open(cfg.data.path, verify=cfg.data.verify)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {cfg.model.vocab_size} is smaller than the vocabulary of "
            f"{cfg.data.path} ({data.vocab_size}, tokenizer {data.tokenizer_name})"
        )
    return data


def train_step(
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
) -> StepResult:
    """Forward/backward over the micro-batches, clip, and step unless non-finite."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.train.dtype == "bf16")
    loss_sum = bal_sum = 0.0
    dropped = assignments = 0
    expert_tokens = None
    for inputs, targets in micro_batches:
        with autocast:
            logits, stats = model(inputs)
            loss = lm_loss(logits, targets)
        ((loss + stats.balance_loss) / len(micro_batches)).backward()
        loss_sum = loss_sum + loss.detach().double()  # read once, after the step
        bal_sum = bal_sum + stats.balance_loss.detach().double()
        dropped += stats.dropped
        assignments += stats.assignments
        counts = stats.expert_counts_LE.sum(0)
        expert_tokens = counts if expert_tokens is None else expert_tokens + counts
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    result = StepResult(
        float(loss_sum) / n, float(bal_sum) / n, grad_norm, dropped, assignments, skipped
    )
    result.expert_tokens = [int(c) for c in expert_tokens.tolist()]
    return result


def _micro_batches(
    data: TokenData, sampler: BatchSampler, cfg: Config, device: torch.device, shard: tuple
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches: ``shard`` = (its replica's sequences, its sequence columns)."""
    rows, cols = shard
    starts = sampler.next_starts()[rows]
    micro = cfg.micro_batch_size
    out = []
    for i in range(0, len(starts), micro):
        x, y = batch_from_starts(data.tokens, starts[i : i + micro], cfg.model.seq_len)
        out.append((x[:, cols].to(device), y[:, cols].to(device)))
    return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def describe(cfg: Config, data: TokenData, device: torch.device, world: int = 1) -> str:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    layout = (
        f"reference of n={p.n} (router groups {p.n})"
        if world == 1
        else f"{world} ranks: n={p.n} attention={p.attention} ffn={p.ffn}"
    )
    return (
        f"megamoe: {total_params(m) / 1e6:.2f}M parameters "
        f"({activated_gemm_params(m) / 1e6:.2f}M activated GEMM), {m.layers} layers, "
        f"{m.experts} experts top-{m.topk}; {layout}; "
        f"{device.type} ({torch.get_num_threads()} threads per rank), {t.dtype}; "
        f"data {cfg.data.path}: {data.num_tokens:,} tokens ({data.tokenizer_name}); "
        f"{t.steps} steps x {t.global_batch} x {m.seq_len} tokens"
    )


def unbuilt_notes(cfg: Config) -> list[str]:
    """Settings that validate but have no effect in this build; said out loud, not ignored."""
    del cfg
    return []


def train(
    cfg: Config,
    summary_path: str | None = None,
    out: TextIO = sys.stdout,
    resume_from: str | None = None,
    reporter: Any = None,
) -> dict[str, Any]:
    """Train in one process: the single-device reference of the configured layout."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    peak = peak_flops(device, cfg.train.dtype, cfg.observe.peak_tflops)
    worker = Worker(
        rank=0, world=1, device=device, peak_flops=peak, resume_from=resume_from, reporter=reporter
    )
    return run(cfg, worker, summary_path, out)


def _build_step(cfg: Config, w: Worker):
    """Model, optimizer, step function and this rank's (replica rows, sequence columns)
    of a batch."""
    if w.world == 1:
        model = build_model(cfg, w.device)
        optimizer = build_optimizer(model, cfg.train)
        step = lambda batches: train_step(model, optimizer, batches, cfg)  # noqa: E731
        return model, optimizer, step, (slice(None), slice(None))
    from trainer.parallel.model import build_parallel_model
    from trainer.parallel.pipeline import StageRunner
    from trainer.parallel.step import parallel_train_step
    from trainer.parallel.zero import ZeroOptimizer, chunk_arming

    d, c = w.dims, w.comms
    model = build_parallel_model(cfg, c.n, d.n_index, w.device, stage=d.pp_index)
    optimizer = ZeroOptimizer(model, cfg.train, c.n, c.dp, cfg.comm.grad_sync, cfg.comm.overlap)
    # the pipeline ranks before and after this one, wrapping round (interleaving feeds
    # rank P - 1's chunk j to rank 0's chunk j + 1)
    peers = tuple(d.rank_of(d.dp_index, (d.pp_index + k) % d.pp, d.n_index) for k in (-1, 1))
    arm = chunk_arming(optimizer, model) if cfg.comm.overlap else None
    runner = StageRunner(model, cfg, c.pp, peers, arm)
    L = cfg.model.seq_len // d.n
    rows = cfg.train.global_batch // d.dp
    shard = (
        slice(d.dp_index * rows, (d.dp_index + 1) * rows),
        slice(d.n_index * L, (d.n_index + 1) * L),
    )
    step = lambda batches: parallel_train_step(runner, optimizer, batches, cfg, c)  # noqa: E731
    return model, optimizer, step, shard


def optimizer_state_bytes(optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def run(cfg: Config, w: Worker, summary_path: str | None, out: TextIO) -> dict[str, Any]:
    """The training loop, the same for one process and for each of N ranks."""
    use_tensor_cores(w.device, cfg.train.dtype)
    use_fused_kernels(cfg.train.fused_kernels)
    hostmem.apply(cfg.train.host_memory)
    data = open_data(cfg)
    sampler = BatchSampler(
        data.num_tokens, cfg.model.seq_len, cfg.train.global_batch, cfg.train.seed
    )
    model, optimizer, step_fn, shard = _build_step(cfg, w)
    if w.rank == 0:
        print(describe(cfg, data, w.device, w.world), file=out, flush=True)
        for note in unbuilt_notes(cfg):
            print(f"note: {note}", file=out, flush=True)
    progress = _resume(cfg, w, model, optimizer, sampler, out)
    metrics = _metrics(cfg, w, out)
    ckpt = _checkpointer(cfg, w, out, metrics)
    log = RunLog(
        total_steps=cfg.train.steps,
        flops_per_token=flops_per_token(cfg.model),
        peak_flops=w.peak_flops,
        log_interval=cfg.observe.log_interval,
        out=out,
    )
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
    if w.reporter and w.comms:
        stats = w.comms.world.stats
        w.reporter.live = lambda: {"collectives": stats.entered, "last_op": stats.last_tag}
    faults = Faults(cfg.fault, w.rank)
    if faults.any:
        print(f"fault injection on rank {w.rank}: {cfg.fault}", file=sys.stderr, flush=True)
    wall_start = time.perf_counter()
    clock = Clock(w.device)
    bubbles: list[float] = []
    for step in range(progress.step + 1, cfg.train.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        batches = _micro_batches(data, sampler, cfg, w.device, shard)
        start = clock.mark()  # CUDA events on a GPU: the step's device time
        faults.before_step(step)
        result = step_fn(batches)
        seconds = step_seconds(start, clock.mark())
        faults.after_step(seconds, result.exposed_s)
        if result.bubble is not None:
            bubbles.append(result.bubble)
        record = StepRecord.of(step, result, lr_at(step, cfg.train), seconds, tokens_per_step)
        log.add(record)
        progress.advance(step, tokens_per_step, result, sampler.state_dict())
        if w.reporter:
            w.reporter.step(_report(log, progress, w.resume_from))
        if metrics:
            metrics.step(record, *_rates(log), _comm_totals(w))
        if ckpt and ckpt.due(step):
            ckpt.save(step, progress, model, optimizer)
    if hasattr(optimizer, "wait_params"):
        optimizer.wait_params()  # the last step's prefetched parameter gathers
    if ckpt:
        ckpt.wait()  # the last save commits before the run reports
    if metrics:
        metrics.close()
    step_times = [r.seconds for r in log.records]
    summary = log.summary(
        rank_step_times_s=_gather_ranks(w, step_times),
        wall_s=time.perf_counter() - wall_start,
        **_comm_summary(w, len(log.records)),
        peak_memory_bytes=peak_memory_bytes(w.device),
        layout=_layout(cfg, w),
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        pipeline=_pipeline_summary(cfg, bubbles),
        device=str(w.device),
        dtype=cfg.train.dtype,
        data={"path": cfg.data.path, "tokens": data.num_tokens, "tokenizer": data.tokenizer_name},
        sampler=sampler.state_dict(),
        skipped_steps_total=progress.skipped,
        resumed_from=_resumed_from(w, progress),
        checkpoint=ckpt.summary() if ckpt else None,
        config=cfg.to_dict(),
    )
    if w.rank == 0:
        _print_done(summary, out)
        if summary_path:
            write_json_atomic(summary_path, summary)
        if w.reporter:
            w.reporter.finished(
                {
                    "final_loss": summary["final_loss"],
                    "steps": progress.step,
                    "tokens": progress.tokens,
                    "tokens_per_s": summary["tokens_per_s"],
                    "mfu": summary["mfu"],
                    "summary_path": str(Path(summary_path).resolve()) if summary_path else "",
                }
            )
    return summary


REPORT_WINDOW = 10  # steps behind the reported tokens/s


def _rates(log: RunLog) -> tuple[float, float]:
    """(tokens/s, MFU) over the last REPORT_WINDOW steps."""
    recent = log.records[-REPORT_WINDOW:]
    seconds = sum(r.seconds for r in recent)
    tokens_per_s = sum(r.tokens for r in recent) / seconds if seconds else 0.0
    return tokens_per_s, log.mfu(tokens_per_s)


def _comm_totals(w: Worker) -> dict[str, dict[str, float]] | None:
    """This rank's cumulative collective bytes / seconds / exposed seconds per operator."""
    if w.comms is None:
        return None
    stats = w.comms.world.stats
    return {
        "bytes": dict(stats.tags),
        "seconds": dict(stats.tag_seconds),
        "exposed": dict(stats.tag_exposed),
    }


def _metrics(cfg: Config, w: Worker, out: TextIO):
    """This rank's Prometheus exporter, when ``observe.metrics_port`` is set."""
    if not cfg.observe.metrics_port:
        return None
    import os

    from trainer.observe.metrics import RankMetrics, metrics_port

    local = int(os.environ.get("LOCAL_RANK", w.rank))  # --nproc ranks are all local
    port = metrics_port(cfg.observe.metrics_port, local)
    job_id = os.environ.get("MEGAMOE_JOB_ID", "")
    node = int(os.environ.get("MEGAMOE_NODE", os.environ.get("GROUP_RANK", 0)))
    generation = int(os.environ.get("MEGAMOE_GENERATION", 0))
    try:
        metrics = RankMetrics(port, cfg.observe.metrics_host, job_id, w.rank, node, generation)
    except OSError as exc:
        raise ConfigError(
            f"observe.metrics_port: rank {w.rank} cannot serve metrics on "
            f"{cfg.observe.metrics_host}:{port}: {exc.strerror}"
        ) from None
    if w.rank == 0:
        where = f"{cfg.observe.metrics_host}:{metrics.port}"
        print(f"metrics: rank 0 on http://{where}/metrics (rank i: port + local i)", file=out)
    return metrics


def _report(log: RunLog, progress: Progress, resumed_from: str | None) -> dict[str, Any]:
    """What a rank tells the control plane after a step (loss is batch-wide on rank 0)."""
    tokens_per_s, mfu = _rates(log)
    recent = log.records[-REPORT_WINDOW:]
    return {
        "step": progress.step,
        "total_steps": log.total_steps,
        "tokens": progress.tokens,
        "loss": recent[-1].loss,
        "step_s": recent[-1].seconds,
        # the straggler signal: in a synchronous world every rank's step takes as long as
        # the slowest's, but only the straggler spends it computing instead of waiting
        "compute_s": recent[-1].seconds - (recent[-1].exposed_s or 0.0),
        "wait_s": recent[-1].exposed_s or 0.0,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "resumed_step": progress.resumed_step,
        "resumed_from": resumed_from,
    }


def _gather_ranks(w: Worker, values: list[float]) -> list[list[float]]:
    """Every rank's ``values``, in rank order (a straggler shows in the per-rank step times)."""
    if w.dims is None:
        return [values]
    import torch.distributed as dist

    gathered: list = [None] * w.world
    dist.all_gather_object(gathered, values, group=w.dims.checkpoint_group)
    return gathered


def _resume(cfg: Config, w: Worker, model, optimizer, sampler, out: TextIO) -> Progress:
    """The state of ``w.resume_from`` loaded into this rank (a fresh Progress without one)."""
    if not w.resume_from:
        return Progress()
    from trainer.checkpoint.manager import restore

    group = w.dims.checkpoint_group if w.dims else None
    start = time.perf_counter()
    progress = restore(Path(w.resume_from), cfg, w.rank, w.world, w.device, group, model, optimizer)
    sampler.load_state_dict(progress.sampler)
    progress.resumed_step = progress.step
    progress.restore_s = time.perf_counter() - start
    if w.rank == 0:
        print(
            f"resumed from {w.resume_from} at step {progress.step} "
            f"({progress.tokens:,} tokens) in {progress.restore_s:.2f} s",
            file=out,
            flush=True,
        )
    return progress


def _resumed_from(w: Worker, progress: Progress) -> dict[str, Any] | None:
    if not w.resume_from:
        return None
    return {
        "step": progress.resumed_step,
        "path": str(w.resume_from),
        "restore_s": progress.restore_s,
    }


def _checkpointer(cfg: Config, w: Worker, out: TextIO, metrics=None):
    if not (cfg.checkpoint.dir and cfg.checkpoint.interval):
        return None
    from trainer.checkpoint.manager import Checkpointer

    group = w.dims.checkpoint_group if w.dims else None
    on_commit = w.reporter.checkpoint if w.reporter and w.rank == 0 else None
    on_saved = metrics.checkpoint if metrics else None
    layout = _layout(cfg, w)
    return Checkpointer(cfg, w.rank, w.world, w.device, group, layout, out, on_commit, on_saved)


def _comm_summary(w: Worker, steps: int) -> dict[str, Any]:
    """Rank 0's collectives over this invocation (empty for one process)."""
    stats = w.comms.world.stats if w.comms else None
    if stats is None:
        return {
            "comm": {},
            "overlap_ratio": None,
            "comm_per_step": {},
            "comm_bytes_by_tag": {},
            "comm_exposed_s_by_tag": {},
            "fp8_nonfinite": 0,
        }
    return {
        "comm": stats.to_dict(),
        "overlap_ratio": stats.overlap_ratio(),
        "comm_per_step": stats.per_step(max(steps, 1)),
        "comm_bytes_by_tag": dict(sorted(stats.tags.items())),
        "comm_exposed_s_by_tag": dict(sorted(stats.tag_exposed.items())),
        "fp8_nonfinite": int(stats.nonfinite),
    }


def _pipeline_summary(cfg: Config, bubbles: list[float]) -> dict[str, Any]:
    from trainer.parallel.pipeline import theoretical_bubble

    stages, micro, v = cfg.parallel.pp, cfg.micro_batches_per_replica, cfg.parallel.virtual_stages
    return {
        "stages": stages,
        "micro_batches": micro,
        "virtual_stages": v,
        "schedule": "interleaved-1f1b" if v > 1 else "1f1b",
        "bubble_theory": theoretical_bubble(stages, micro, v),
        # the first step pays one-time costs (allocations, kernel warm-up): left out
        "bubble_measured": statistics.median(bubbles[1:] or bubbles) if bubbles else None,
    }


def _layout(cfg: Config, w: Worker) -> dict[str, Any]:
    return {
        **cfg.to_dict()["parallel"],
        "ffn_resolved": cfg.ffn_mode,
        "nproc": w.world,
        "world": w.world,
        "mode": "reference" if w.world == 1 else "parallel",
    }


def _print_done(summary: dict[str, Any], out: TextIO) -> None:
    if not summary["losses"]:
        steps = summary["config"]["train"]["steps"]
        print(f"done: nothing to run, the checkpoint is at step {steps}", file=out, flush=True)
        return
    first, final = summary["losses"][0], summary["final_loss"]
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']:.1f} s, loss {first:.4f} -> "
        f"{final:.4f} ({100 * final / first:.1f} % of the first step), "
        f"{summary['tokens_per_s'] / 1e3:.2f}k tok/s, MFU {100 * summary['mfu']:.2f}%",
        file=out,
        flush=True,
    )
    if summary["fp8_nonfinite"]:
        print(
            f"warning: the FP8 codec met {summary['fp8_nonfinite']} non-finite values on rank 0 "
            "(sent as NaN; those steps were skipped)",
            file=out,
            flush=True,
        )

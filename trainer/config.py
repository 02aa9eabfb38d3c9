"""The run configuration: one frozen dataclass tree, loaded from TOML.

A run is described by one TOML file with the sections ``model``, ``parallel``,
``train``, ``comm``, ``data``, ``checkpoint`` and ``observe``; each section is a
small frozen dataclass owned by the component that uses it. Values can be
overridden with repeatable ``--set section.key=value`` strings, parsed by the
type of the field they override. Everything is validated on load; a problem is
reported as a :class:`~trainer.errors.ConfigError` whose message names the key
and the value ("model.topk = 9 must be <= model.experts = 8").

This module imports no torch: the control plane validates job specs with it
without building a model.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from trainer.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the MoE transformer (the vocabulary of MegaScale-MoE (arXiv 2505.11432),
    Table 2)."""

    vocab_size: int = 512
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn_hidden: int = 256  # h_ffn of one routed expert
    experts: int = 8
    topk: int = 2
    shared_experts: int = 0  # always-active experts per layer
    shared_ffn_hidden: int = 0  # h_ffn of one shared expert; 0 = ffn_hidden
    seq_len: int = 128
    capacity_factor: float = 0.0  # per-device capacity; 0 = dropless
    balance_coef: float = 0.05  # alpha of the device-level balance loss
    norm_topk: bool = False  # renormalise the k gate weights to sum to 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def gqa_ratio(self) -> int:
        """m of the paper: query heads per kv head."""
        return self.heads // self.kv_heads

    @property
    def shared_hidden(self) -> int:
        return self.shared_ffn_hidden or self.ffn_hidden


def resolve_ffn(ffn: str, topk: int, n: int) -> str:
    """The FFN mode a layout runs: ``auto`` is all-to-all when k < n (its volume is 2k/n
    of all-gather/reduce-scatter's), else all-gather/reduce-scatter."""
    if ffn != "auto":
        return ffn
    return "ep_a2a" if topk < n else "ep_agrs"


@dataclass(frozen=True)
class ParallelConfig:
    """Layout: world = dp * pp * n; SP group = EP group = n ranks."""

    n: int = 1
    dp: int = 1
    pp: int = 1
    attention: str = "sp"  # sp | tp
    ffn: str = "ep_a2a"  # ep_a2a | ep_agrs | tp | auto
    virtual_stages: int = 1  # interleaved 1F1B: non-adjacent layer chunks per pipeline rank

    @property
    def world(self) -> int:
        return self.n * self.dp * self.pp


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step
    micro_batch: int = 0  # sequences per forward call; 0 = global_batch / parallel.dp
    seed: int = 1234
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per rank; 0 = torch's default
    fused_kernels: bool = False  # SwiGLU elementwise work compiled (torch.compile)
    host_memory: str = "keep"  # keep | release: freed host memory reused by the process


@dataclass(frozen=True)
class CommConfig:
    overlap: bool = False
    chunks: int = 1  # intra-operator pipelining pieces; 1 = no chunking
    fp8: bool = False
    grad_sync: str = "fp32_rs"  # fp32_rs | bf16_a2a


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/demo"  # directory written by `megamoe data prepare`
    verify: bool = False  # check the token file's sha256 before training


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # "" = no checkpoints
    interval: int = 0  # steps between checkpoints; 0 = none
    keep: int = 2  # newest committed checkpoints kept on disk
    keep_every: int = 0  # also keep every checkpoint at a step divisible by this; 0 = none


@dataclass(frozen=True)
class ObserveConfig:
    log_interval: int = 1  # steps between progress lines
    metrics_port: int = 0  # Prometheus exporter port of local rank 0 (rank i: + i); 0 = off
    metrics_host: str = "127.0.0.1"  # address the exporters bind ("0.0.0.0" in a pod)
    peak_tflops: float = 0.0  # MFU denominator per device; 0 = table or probe
    hang_timeout_s: float = 1800.0  # a job without step progress this long is hung; 0 = off


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection, a testing aid (docs/OBSERVABILITY.md); every fault is off by default.
    A fault applies to the job's world of generation ``generation`` only (-1: every one),
    so a restarted or replaced world runs clean."""

    slow_rank: int = -1  # this rank computes slow_factor x as long (-1 = none)
    slow_factor: float = 1.0
    hang_rank: int = -1  # this rank stops for good before step hang_step (-1 = none)
    hang_step: int = 0
    kill_rank: int = -1  # this rank SIGKILLs itself before step kill_step (-1 = none)
    kill_step: int = 0
    generation: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def ffn_mode(self) -> str:
        """parallel.ffn with ``auto`` resolved for this model and n."""
        return resolve_ffn(self.parallel.ffn, self.model.topk, self.parallel.n)

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward call: train.micro_batch, or one data-parallel share."""
        return self.train.micro_batch or self.train.global_batch // self.parallel.dp

    @property
    def micro_batches_per_replica(self) -> int:
        return self.train.global_batch // (self.parallel.dp * self.micro_batch_size)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]

CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.attention": ("sp", "tp"),
    "parallel.ffn": ("ep_a2a", "ep_agrs", "tp", "auto"),
    "train.dtype": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.host_memory": ("keep", "release"),
    "comm.grad_sync": ("fp32_rs", "bf16_a2a"),
}

POSITIVE = (
    "model.vocab_size model.hidden model.layers model.heads model.kv_heads model.ffn_hidden "
    "model.experts model.topk model.seq_len parallel.n parallel.dp parallel.pp "
    "parallel.virtual_stages train.steps train.global_batch comm.chunks observe.log_interval "
    "checkpoint.keep model.rope_theta model.norm_eps model.init_std"
).split()
NON_NEGATIVE = (
    "model.shared_experts model.shared_ffn_hidden model.capacity_factor model.balance_coef "
    "train.micro_batch train.lr train.min_lr train.warmup_steps train.weight_decay "
    "train.grad_clip train.threads checkpoint.interval checkpoint.keep_every "
    "observe.metrics_port observe.peak_tflops observe.hang_timeout_s"
).split()


_ACCEPTED: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
}


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check a TOML value against the field type (ints are accepted for floats)."""
    # bool is a subclass of int in Python: `layers = true` must not pass as 1.
    ok = isinstance(value, _ACCEPTED[typ]) and (typ is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} = {value!r} must be of type {typ.__name__}")
    return float(value) if typ is float else value


def _parse_override_value(key: str, text: str, typ: type) -> Any:
    """Parse the text after '=' of a --set override by the field's type."""
    text = text.strip()
    if typ is str:
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    if typ is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} = {text!r} must be a boolean (true or false)")
    try:
        return typ(text) if typ is float else int(text, 0)
    except ValueError:
        raise ConfigError(f"{key} = {text!r} must be of type {typ.__name__}") from None


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {name}.{key} (known keys of [{name}]: {', '.join(sorted(known))})"
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(tree: dict[str, Any], check: bool = True) -> Config:
    """Build a Config from a nested dict (as TOML gives it); validate it with ``check``."""
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
        sections[name] = _build_section(name, values)
    cfg = Config(**sections)
    if check:
        validate(cfg)
    return cfg


def parse_override(cfg: Config, item: str) -> tuple[str, str, Any]:
    """(section, key, typed value) of one ``section.key=value`` string, or ConfigError."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, text = item.split("=", 1)
    path = path.strip()
    if path.count(".") != 1:
        raise ConfigError(f"override key {path!r} must look like section.key")
    section, key = path.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section [{section}] in override {item!r}")
    hints = get_type_hints(type(getattr(cfg, section)))
    if key not in hints:
        raise ConfigError(f"unknown key {path} in override {item!r}")
    return section, key, _parse_override_value(path, text, hints[key])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; the result is validated again."""
    for item in overrides:
        section, key, value = parse_override(cfg, item)
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a TOML config file, apply overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return loads(text, overrides, source=f"config file {path}")


def loads(text: str, overrides: list[str] | None = None, source: str = "config") -> Config:
    """Parse TOML text (a job spec's config, a file's content), apply overrides, validate.

    ``source`` names the text in errors ("config file configs/tiny.toml"). The rules
    between keys are checked once the overrides are applied, so an override can
    complete a file (``checkpoint.interval`` in the file, ``checkpoint.dir`` given)."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    where = source.removeprefix("config file ")
    try:
        cfg = from_dict(tree, check=not overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return apply_overrides(cfg, overrides) if overrides else cfg


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_fault(cfg: Config) -> None:
    f, world = cfg.fault, cfg.parallel.world
    for name in ("slow_rank", "hang_rank", "kill_rank"):
        rank = getattr(f, name)
        _require(
            rank == -1 or 0 <= rank < world,
            f"fault.{name} = {rank} must be -1 (off) or a rank of the world (0..{world - 1})",
        )
    _require(
        f.slow_factor >= 1 and math.isfinite(f.slow_factor),
        f"fault.slow_factor = {f.slow_factor} must be >= 1",
    )
    for name in ("hang_step", "kill_step"):
        _require(getattr(f, name) >= 0, f"fault.{name} = {getattr(f, name)} must be >= 0")
    _require(f.generation >= -1, f"fault.generation = {f.generation} must be >= -1")


def validate(cfg: Config) -> None:
    """Check every value and the arithmetic between them; raise ConfigError naming the keys."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, f"{key} = {value!r} must be one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        _require(value > 0 and math.isfinite(value), f"{key} = {value!r} must be > 0")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        _require(value >= 0 and math.isfinite(value), f"{key} = {value!r} must be >= 0")
    _validate_model(cfg.model)
    _validate_layout(cfg)
    _validate_fault(cfg)
    _validate_train(cfg)
    _validate_checkpoint(cfg.checkpoint)
    _require(
        cfg.observe.metrics_port <= 65535,
        f"observe.metrics_port = {cfg.observe.metrics_port} must be <= 65535",
    )


def _validate_model(m: ModelConfig) -> None:
    _require(
        m.hidden % m.heads == 0,
        f"model.hidden = {m.hidden} must be divisible by model.heads = {m.heads}",
    )
    _require(
        m.head_dim % 2 == 0,
        f"model.hidden / model.heads = {m.head_dim} must be even (RoPE rotates pairs)",
    )
    _require(
        m.heads % m.kv_heads == 0,
        f"model.heads = {m.heads} must be divisible by model.kv_heads = {m.kv_heads}",
    )
    _require(
        m.topk <= m.experts,
        f"model.topk = {m.topk} must be <= model.experts = {m.experts}",
    )


def _validate_layout(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    _require(
        m.experts % p.n == 0,
        f"model.experts = {m.experts} must be divisible by parallel.n = {p.n} "
        "(each of the n ranks holds whole experts)",
    )
    _require(
        m.layers % p.pp == 0,
        f"model.layers = {m.layers} must be divisible by parallel.pp = {p.pp} "
        "(every pipeline stage holds the same number of layers)",
    )
    v = p.virtual_stages
    _require(
        v == 1 or p.pp > 1,
        f"parallel.virtual_stages = {v} needs parallel.pp > 1 (got parallel.pp = {p.pp})",
    )
    _require(
        m.layers % (p.pp * v) == 0,
        f"model.layers = {m.layers} must be divisible by parallel.pp * parallel.virtual_stages "
        f"= {p.pp} * {v} = {p.pp * v} (every virtual stage holds the same number of layers)",
    )
    _require(
        cfg.comm.chunks <= m.seq_len,
        f"comm.chunks = {cfg.comm.chunks} must be <= model.seq_len = {m.seq_len}",
    )


def _validate_interleaving(cfg: Config) -> None:
    """Interleaved 1F1B runs the micro-batches in rounds of pp: every rank fills its v
    chunks pp micro-batches at a time, so their count must be a whole number of rounds."""
    p, M = cfg.parallel, cfg.micro_batches_per_replica
    if p.virtual_stages == 1:
        return
    _require(
        M % p.pp == 0,
        f"parallel.virtual_stages = {p.virtual_stages} needs the micro-batches per replica, "
        f"train.global_batch / (parallel.dp * micro-batch) = {cfg.train.global_batch} / "
        f"({p.dp} * {cfg.micro_batch_size}) = {M}, to be a multiple of parallel.pp = {p.pp} "
        "(interleaved 1F1B runs them in rounds of pp)",
    )


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(
        not c.interval or c.dir,
        f"checkpoint.interval = {c.interval} needs checkpoint.dir (where to write them)",
    )
    _require(c.keep >= 1, f"checkpoint.keep = {c.keep} must be >= 1")


def _validate_train(cfg: Config) -> None:
    t, dp = cfg.train, cfg.parallel.dp
    _require(
        t.global_batch % dp == 0,
        f"train.global_batch = {t.global_batch} must be divisible by parallel.dp = {dp}",
    )
    _require(
        (t.global_batch // dp) % cfg.micro_batch_size == 0,
        f"train.global_batch / parallel.dp = {t.global_batch // dp} sequences per replica must "
        f"be divisible by train.micro_batch = {t.micro_batch}",
    )
    _validate_interleaving(cfg)
    _require(
        t.min_lr <= t.lr,
        f"train.min_lr = {t.min_lr} must be <= train.lr = {t.lr}",
    )

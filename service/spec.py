"""Validation of a JobSpec, with the trainer's own config code (no second copy of its rules).

``validate_spec`` returns the trainer Config the job will run with (its
``checkpoint.dir`` a placeholder when the spec sets none: the executor puts
it under the job's directory), or raises
InvalidArgument naming the field (``spec.num_nodes``, ``spec.overrides[2]``,
``spec.config_toml``, ...) and the reason. Besides the config itself it checks
what only a job has: node and process counts against the config's layout
(dp x pp x n = nodes x processes per node), the restart and straggler policies,
labels, the image, the job id, and sizes, so that no request can make the
control plane store or parse something unbounded.
"""

from __future__ import annotations

import math
import re
import tomllib

from service.errors import InvalidArgument
from trainer.config import Config, apply_overrides, loads, parse_override
from trainer.errors import ConfigError
from trainer.parallel.dims import check_layout

MAX_CONFIG_BYTES = 64 * 1024
MAX_OVERRIDES = 256
MAX_OVERRIDE_CHARS = 1024
MAX_NODES = 4096
MAX_PROCS_PER_NODE = 64
MAX_RESTARTS = 1000
MAX_BACKOFF_S = 3600.0
MAX_LABELS = 64
JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
# Kubernetes syntax of the pod settings: a resource quantity, a DNS subdomain (object
# names), a label name (optionally prefixed) and a label value.
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
TOLERATION_OPERATORS = ("", "Equal", "Exists")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
MAX_TOLERATIONS = 32
STRAGGLER_VALUES = (0, 1, 2, 3)  # unspecified (= report), off, report, replace
JOB_CHECKPOINT_DIR = "<job directory>/checkpoints"  # stands for the executor's choice


def validate_job_id(job_id: str) -> None:
    if not JOB_ID.match(job_id):
        raise InvalidArgument(
            "job_id",
            f"{job_id!r} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter "
            "or digit",
        )


def sets_checkpoint_dir(spec) -> bool:
    """Whether the spec's TOML or one of its overrides names a checkpoint directory."""
    try:
        section = tomllib.loads(spec.config_toml).get("checkpoint", {})
    except tomllib.TOMLDecodeError:
        return False  # validate_spec reports it
    if isinstance(section, dict) and section.get("dir"):
        return True
    for item in reversed(spec.overrides):  # the last one wins
        key, _, value = item.partition("=")
        if key.strip() == "checkpoint.dir":
            return bool(value.strip().strip("'\""))
    return False


def validate_spec(spec) -> Config:
    """The Config of a JobSpec message, or InvalidArgument naming the field."""
    if len(spec.config_toml.encode()) > MAX_CONFIG_BYTES:
        raise InvalidArgument(
            "spec.config_toml",
            f"{len(spec.config_toml.encode())} bytes; at most {MAX_CONFIG_BYTES} are accepted",
        )
    _check_overrides(list(spec.overrides))
    _check_counts(spec.num_nodes, spec.procs_per_node)
    _check_policies(spec)
    _check_kubernetes(spec)
    # The executor gives a job without checkpoint.dir one under its job directory.
    defaults = [] if sets_checkpoint_dir(spec) else [f"checkpoint.dir={JOB_CHECKPOINT_DIR}"]
    try:
        base = loads(spec.config_toml, defaults, source="spec.config_toml")
    except ConfigError as exc:
        reason = str(exc).removeprefix("spec.config_toml: ")
        raise InvalidArgument("spec.config_toml", reason) from None
    for i, item in enumerate(spec.overrides):
        try:  # syntax, unknown keys and types are this override's own fault
            parse_override(base, item)
        except ConfigError as exc:
            raise InvalidArgument(f"spec.overrides[{i}]", str(exc)) from None
    try:  # the combination (validated once every override is applied)
        cfg = apply_overrides(base, list(spec.overrides))
    except ConfigError as exc:
        raise InvalidArgument("spec.overrides", str(exc)) from None
    world = spec.num_nodes * spec.procs_per_node
    try:
        check_layout(cfg, world, "num_nodes * procs_per_node")
    except ConfigError as exc:
        raise InvalidArgument(
            "spec.num_nodes",
            f"{spec.num_nodes} nodes x {spec.procs_per_node} processes = {world} ranks do not fit "
            f"the config: {str(exc).removeprefix('invalid parallel layout: ')}",
        ) from None
    return cfg


def _check_overrides(overrides: list[str]) -> None:
    if len(overrides) > MAX_OVERRIDES:
        raise InvalidArgument(
            "spec.overrides", f"{len(overrides)} overrides; at most {MAX_OVERRIDES}"
        )
    for i, item in enumerate(overrides):
        if len(item) > MAX_OVERRIDE_CHARS:
            raise InvalidArgument(
                f"spec.overrides[{i}]", f"{len(item)} characters; at most {MAX_OVERRIDE_CHARS}"
            )


def _check_counts(nodes: int, procs: int) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise InvalidArgument("spec.num_nodes", f"{nodes} must be between 1 and {MAX_NODES}")
    if not 1 <= procs <= MAX_PROCS_PER_NODE:
        raise InvalidArgument(
            "spec.procs_per_node", f"{procs} must be between 1 and {MAX_PROCS_PER_NODE}"
        )


def _check_policies(spec) -> None:
    r = spec.restart
    if not 0 <= r.max_restarts <= MAX_RESTARTS:
        raise InvalidArgument(
            "spec.restart.max_restarts", f"{r.max_restarts} must be between 0 and {MAX_RESTARTS}"
        )
    for name in ("backoff_seconds", "max_backoff_seconds"):
        value = getattr(r, name)
        if not (math.isfinite(value) and 0 <= value <= MAX_BACKOFF_S):
            raise InvalidArgument(
                f"spec.restart.{name}", f"{value} must be between 0 and {MAX_BACKOFF_S:g} seconds"
            )
    if r.max_backoff_seconds and r.max_backoff_seconds < r.backoff_seconds:
        raise InvalidArgument(
            "spec.restart.max_backoff_seconds",
            f"{r.max_backoff_seconds} is below spec.restart.backoff_seconds = {r.backoff_seconds}",
        )
    if spec.straggler not in STRAGGLER_VALUES:
        raise InvalidArgument("spec.straggler", f"{spec.straggler} is not a StragglerPolicy")
    if spec.image and not IMAGE.match(spec.image):
        raise InvalidArgument("spec.image", f"{spec.image!r} is not a container image reference")
    if len(spec.labels) > MAX_LABELS:
        raise InvalidArgument("spec.labels", f"{len(spec.labels)} labels; at most {MAX_LABELS}")
    for key, value in spec.labels.items():
        if not LABEL_KEY.match(key):
            raise InvalidArgument(
                f"spec.labels[{key!r}]", "keys are 1-63 of A-Z a-z 0-9 . _ / -, alphanumeric ends"
            )
        if len(value) > 256:
            raise InvalidArgument(
                f"spec.labels[{key!r}]", f"value of {len(value)} characters; at most 256"
            )


def _check_kubernetes(spec) -> None:
    """The pod settings, in Kubernetes' own syntax, so a bad one is refused at submit time
    rather than by the API server when the executor creates the pods."""
    k = spec.kubernetes
    for name in ("cpu", "memory"):
        value = getattr(k, name)
        if value and not QUANTITY.match(value):
            raise InvalidArgument(
                f"spec.kubernetes.{name}",
                f"{value!r} is not a Kubernetes quantity (e.g. '16', '7500m', '200Gi')",
            )
    if k.HasField("gpus"):
        if not 0 <= k.gpus <= MAX_PROCS_PER_NODE:
            raise InvalidArgument(
                "spec.kubernetes.gpus", f"{k.gpus} must be between 0 and {MAX_PROCS_PER_NODE}"
            )
        if 0 < k.gpus < spec.procs_per_node:
            raise InvalidArgument(
                "spec.kubernetes.gpus",
                f"{k.gpus} GPUs for {spec.procs_per_node} processes per node: each process "
                "needs a GPU of its own (0 = CPU-only pods)",
            )
    for name in ("priority_class", "volume_claim"):
        value = getattr(k, name)
        if value and not DNS_SUBDOMAIN.match(value):
            raise InvalidArgument(
                f"spec.kubernetes.{name}",
                f"{value!r} is not a Kubernetes object name (lower-case a-z, 0-9, '-', '.')",
            )
    if len(k.node_selector) > MAX_LABELS:
        raise InvalidArgument(
            "spec.kubernetes.node_selector", f"{len(k.node_selector)} entries; at most {MAX_LABELS}"
        )
    for key, value in k.node_selector.items():
        if not LABEL_NAME.match(key) or not LABEL_VALUE.match(value):
            raise InvalidArgument(
                f"spec.kubernetes.node_selector[{key!r}]",
                f"{key}={value} is not a Kubernetes label (names and values: up to 63 of "
                "A-Z a-z 0-9 - _ . with alphanumeric ends, names optionally prefixed 'domain/')",
            )
    if len(k.tolerations) > MAX_TOLERATIONS:
        raise InvalidArgument(
            "spec.kubernetes.tolerations",
            f"{len(k.tolerations)} tolerations; at most {MAX_TOLERATIONS}",
        )
    for i, t in enumerate(k.tolerations):
        _check_toleration(f"spec.kubernetes.tolerations[{i}]", t)


def _check_toleration(field: str, t) -> None:
    if t.operator not in TOLERATION_OPERATORS:
        raise InvalidArgument(f"{field}.operator", f"{t.operator!r} is not Equal or Exists")
    if t.effect not in TOLERATION_EFFECTS:
        raise InvalidArgument(
            f"{field}.effect", f"{t.effect!r} is not NoSchedule, PreferNoSchedule or NoExecute"
        )
    if t.key and not LABEL_NAME.match(t.key):
        raise InvalidArgument(f"{field}.key", f"{t.key!r} is not a Kubernetes label name")
    if not t.key and t.operator != "Exists":
        raise InvalidArgument(f"{field}.key", "an empty key tolerates everything: operator Exists")
    if t.operator == "Exists" and t.value:
        raise InvalidArgument(f"{field}.value", "operator Exists takes no value")
    if t.value and not LABEL_VALUE.match(t.value):
        raise InvalidArgument(f"{field}.value", f"{t.value!r} is not a Kubernetes label value")
    if t.HasField("toleration_seconds") and t.effect != "NoExecute":
        raise InvalidArgument(f"{field}.toleration_seconds", "only a NoExecute toleration has one")

"""The Kubernetes objects of a job, rendered by pure functions (golden files test them).

Per job the Kubernetes executor (``service.kube``) applies:

- a **ConfigMap** ``megamoe-job-<job>`` holding the job's config TOML. It is the job's
  parent object: every other object names it in ``ownerReferences``, so deleting
  it makes Kubernetes' garbage collector delete the job's pods and Service;
- a **headless Service** of the same name: each node's pod gets the DNS name
  ``n<k>.megamoe-job-<job>.<namespace>.svc`` (``hostname`` + ``subdomain``);
- one **pod per node and generation**, ``megamoe-job-<job>-g<generation>-n<node>``:
  one torchrun agent with ``procs_per_node`` workers, the etcd v3 rendezvous
  against the control plane's etcd, ``nvidia.com/gpu`` = processes per node
  (or the spec's count), the job volume (checkpoints, data, the run summary)
  mounted as the working directory, ``restartPolicy: Never``: a pod that fails
  is replaced as a new generation by the reconciler, like a local node.

The pod settings come from the job's spec (``JobSpec.kubernetes``) or, field by
field, from the control plane's defaults (``PodDefaults``, the chart's
``workers`` values). Every pod is hardened the way the chart's own pods are:
non-root uid 10001, read-only root filesystem (``/tmp`` an ``emptyDir``, ``/dev/shm``
a memory-backed one), no capabilities, the RuntimeDefault seccomp
profile, no service account token (workers never call the Kubernetes API).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.executor import ENV_NODE, agent_args, train_args
from service.spec import sets_checkpoint_dir
from trainer.elastic.report import ENV_ETCD, ENV_GENERATION, ENV_JOB, ENV_PREFIX
from trainer.errors import MegamoeError

APP = "megamoe"
MANAGED_BY = "megamoe"
LABEL_JOB = "megamoe.io/job"
LABEL_NODE = "megamoe.io/node"
LABEL_GENERATION = "megamoe.io/generation"
ANNOTATION_JOB_ID = "megamoe.io/job-id"
CONFIG_DIR = "/etc/megamoe/job"
CONFIG_KEY = "config.toml"
CONTAINER = "worker"
UID = 10001  # the image's user (Dockerfile)
TERMINATION_GRACE_S = 30
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # of a job id


# serve.json's camelCase keys -> fields
CONFIG_KEYS = {
    "image": "image",
    "namespace": "namespace",
    "release": "release",
    "imagePullPolicy": "image_pull_policy",
    "imagePullSecrets": "image_pull_secrets",
    "serviceAccountName": "service_account_name",
    "cpu": "cpu",
    "memory": "memory",
    "gpuResource": "gpu_resource",
    "nodeSelector": "node_selector",
    "tolerations": "tolerations",
    "priorityClassName": "priority_class_name",
    "volumeClaim": "volume_claim",
    "volumeMountPath": "volume_mount_path",
    "metricsPort": "metrics_port",
    "etcd": "etcd",
}


# The non-string fields' JSON types.
KINDS: dict[str, type | tuple[type, ...]] = {
    "image_pull_secrets": list,
    "node_selector": dict,
    "tolerations": list,
    "metrics_port": int,
}


@dataclass(frozen=True)
class PodDefaults:
    """What a job's pods get when its spec does not say (``serve.json``'s ``kubernetes``)."""

    image: str = "ghcr.io/megamoe/megamoe:0.1.0"
    namespace: str = ""  # the executor's namespace; "" = the control plane's own
    release: str = "megamoe"  # app.kubernetes.io/instance of the pods (the helm release)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str = ""
    cpu: str = ""
    memory: str = ""
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    priority_class_name: str = ""
    volume_claim: str = ""  # PVC of checkpoints, data, summaries; "" = a scratch emptyDir
    volume_mount_path: str = "/mnt/megamoe"
    metrics_port: int = 9500  # rank i of a pod serves metrics on this + i
    etcd: str = ""  # the workers' etcd (the control plane's, as they reach it)
    prefix: str = "/megamoe"

    @classmethod
    def from_config(cls, raw: dict[str, Any], etcd: str, prefix: str) -> PodDefaults:
        """From serve.json's ``kubernetes`` object; ``etcd``/``prefix``: the control
        plane's, used when the object names no etcd of its own for the workers."""
        values: dict[str, Any] = {"etcd": etcd, "prefix": prefix}
        for key, value in raw.items():
            if key not in CONFIG_KEYS:
                known = ", ".join(CONFIG_KEYS)
                raise MegamoeError(f"kubernetes.{key}: unknown key (known: {known})")
            name = CONFIG_KEYS[key]
            expected = KINDS.get(name, str)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise MegamoeError(f"kubernetes.{key} = {value!r} has the wrong type")
            if name in ("image_pull_secrets", "tolerations"):
                value = tuple(value)
            if name == "etcd" and not value:
                continue
            values[name] = value
        return cls(**values)


def dns_label(base: str) -> str:
    """``base`` when it is a valid DNS label (Service names, hostnames), else a shortened
    form with a hash of the whole, so two long job ids never share a name."""
    if DNS_LABEL.match(base):
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[:54].rstrip('-')}-{digest}"


def job_name(job_id: str) -> str:
    """The job's ConfigMap and headless Service ("-job-": the chart's own objects are
    named ``<release>-<what>``, and the chart refuses a release named megamoe-job...)."""
    return dns_label(f"{APP}-job-{job_id}")


def pod_name(job_id: str, generation: int, node: int) -> str:
    return f"{job_name(job_id)}-g{generation}-n{node}"


def labels(defaults: PodDefaults, job_id: str) -> dict[str, str]:
    """The labels of every object of a job (the job id itself, when it is not a valid
    label value, as the shortened name; the exact id is the megamoe.io/job-id annotation)."""
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": defaults.release,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job_label(job_id),
    }


def job_label(job_id: str) -> str:
    return job_id if LABEL_VALUE.match(job_id) else job_name(job_id)


def selector(defaults: PodDefaults, job_id: str | None = None) -> str:
    """A label selector for every pod of this control plane (or of one job)."""
    parts = [
        f"app.kubernetes.io/managed-by={MANAGED_BY}",
        f"app.kubernetes.io/instance={defaults.release}",
    ]
    if job_id is not None:
        parts.append(f"{LABEL_JOB}={job_label(job_id)}")
    return ",".join(parts)


def _metadata(name: str, defaults: PodDefaults, job_id: str, owner: dict | None) -> dict:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": defaults.namespace,
        "labels": labels(defaults, job_id),
        "annotations": {ANNOTATION_JOB_ID: job_id},
    }
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def owner_reference(config_map: dict) -> dict:
    """An ownerReference to the job's ConfigMap as the API server returned it (with uid)."""
    meta = config_map["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": meta["name"],
        "uid": meta["uid"],
        "blockOwnerDeletion": True,
    }


def render_config_map(job_id: str, spec: pb.JobSpec, defaults: PodDefaults) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job_name(job_id), defaults, job_id, None),
        "data": {CONFIG_KEY: spec.config_toml},
    }


def render_service(job_id: str, defaults: PodDefaults, owner: dict) -> dict:
    """Headless: DNS records for the job's pods, no virtual IP, no load balancing."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job_name(job_id), defaults, job_id, owner),
        "spec": {
            "clusterIP": "None",
            "selector": {
                "app.kubernetes.io/instance": defaults.release,
                LABEL_JOB: job_label(job_id),
            },
            # the agents find each other through etcd; DNS must not wait for readiness
            "publishNotReadyAddresses": True,
        },
    }


def worker_overrides(job_id: str, spec: pb.JobSpec, defaults: PodDefaults) -> list[str]:
    """The spec's overrides, then what a pod needs: a checkpoint directory on the job
    volume (unless the spec names one) and metrics reachable from other pods on the
    ports the pod declares (these win over the spec: Prometheus scrapes those ports)."""
    sets = list(spec.overrides)
    if not sets_checkpoint_dir(spec):
        sets.append(f"checkpoint.dir={job_dir(job_id, defaults)}/checkpoints")
    sets += [f"observe.metrics_port={defaults.metrics_port}", "observe.metrics_host=0.0.0.0"]
    return sets


def job_dir(job_id: str, defaults: PodDefaults) -> str:
    return f"{defaults.volume_mount_path.rstrip('/')}/jobs/{job_id}"


def render_pod(
    job_id: str,
    spec: pb.JobSpec,
    node: int,
    generation: int,
    defaults: PodDefaults,
    owner: dict,
    skip_checkpoints: Sequence[str] = (),
) -> dict:
    """Node ``node`` of the job's world ``generation`` (see the module doc)."""
    k8s = spec.kubernetes
    name = pod_name(job_id, generation, node)
    meta = _metadata(name, defaults, job_id, owner)
    meta["labels"] |= {LABEL_NODE: str(node), LABEL_GENERATION: str(generation)}
    command = [
        "torchrun",
        *agent_args(spec, f"{job_id}-g{generation}", defaults.etcd, defaults.prefix),
        "--local-addr=$(POD_IP)",
        "megamoe",
        *train_args(
            f"{CONFIG_DIR}/{CONFIG_KEY}",
            worker_overrides(job_id, spec, defaults),
            f"{job_dir(job_id, defaults)}/summary.json",
            skip_checkpoints,
        ),
    ]
    env = [
        {"name": ENV_JOB, "value": job_id},
        {"name": ENV_NODE, "value": str(node)},
        {"name": ENV_GENERATION, "value": str(generation)},
        {"name": ENV_ETCD, "value": defaults.etcd},
        {"name": ENV_PREFIX, "value": defaults.prefix},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},  # caches (torch, matplotlib) off the read-only root
    ]
    container = {
        "name": CONTAINER,
        "image": spec.image or defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": command,
        "workingDir": defaults.volume_mount_path,
        "env": env,
        "ports": [
            {"name": f"metrics-{i}", "containerPort": defaults.metrics_port + i, "protocol": "TCP"}
            for i in range(spec.procs_per_node)
        ],
        "resources": _resources(spec, defaults),
        "volumeMounts": [
            {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "job-volume", "mountPath": defaults.volume_mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # the log's tail becomes the termination message: why it failed, even after the
        # kubelet rotated the log away
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    job_volume: dict[str, Any] = {"name": "job-volume"}
    claim = k8s.volume_claim or defaults.volume_claim
    if claim:
        job_volume["persistentVolumeClaim"] = {"claimName": claim}
    else:
        job_volume["emptyDir"] = {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the reconciler replaces the world, torchrun the workers
        "hostname": f"n{node}",
        "subdomain": job_name(job_id),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "job-config", "configMap": {"name": job_name(job_id)}},
            job_volume,
            {"name": "tmp", "emptyDir": {}},
            # NCCL and the data loader's workers share memory through /dev/shm
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if defaults.service_account_name:
        pod_spec["serviceAccountName"] = defaults.service_account_name
    if defaults.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in defaults.image_pull_secrets]
    node_selector = dict(k8s.node_selector) or dict(defaults.node_selector)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [_toleration(t) for t in k8s.tolerations] or [
        dict(t) for t in defaults.tolerations
    ]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    priority = k8s.priority_class or defaults.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def gpus(spec: pb.JobSpec) -> int:
    return spec.kubernetes.gpus if spec.kubernetes.HasField("gpus") else spec.procs_per_node


def _resources(spec: pb.JobSpec, defaults: PodDefaults) -> dict:
    """Requests = limits (the Guaranteed QoS class: the last a node evicts)."""
    amounts: dict[str, Any] = {}
    cpu = spec.kubernetes.cpu or defaults.cpu
    memory = spec.kubernetes.memory or defaults.memory
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    if gpus(spec):
        amounts[defaults.gpu_resource] = str(gpus(spec))
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _toleration(t: pb.Toleration) -> dict:
    out: dict[str, Any] = {"operator": t.operator or "Equal"}
    if t.key:
        out["key"] = t.key
    if t.value:
        out["value"] = t.value
    if t.effect:
        out["effect"] = t.effect
    if t.HasField("toleration_seconds"):
        out["tolerationSeconds"] = t.toleration_seconds
    return out

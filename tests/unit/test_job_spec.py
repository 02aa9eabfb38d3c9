"""Job specs are validated by the trainer's own config code; every kind of bad spec is
refused as INVALID_ARGUMENT naming the field and the reason."""

from pathlib import Path

import grpc
import pytest

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.errors import InvalidArgument, status_of
from service.spec import validate_job_id, validate_spec

TINY = (Path(__file__).resolve().parents[2] / "configs" / "tiny.toml").read_text()


def spec(**fields):
    base = {"config_toml": TINY, "num_nodes": 2, "procs_per_node": 1, "overrides": ["parallel.n=2"]}
    base.update(fields)
    return pb.JobSpec(**base)


def test_a_good_spec_gives_the_config_it_runs():
    cfg = validate_spec(spec(overrides=["parallel.n=2", "train.steps=7"]))
    assert cfg.parallel.world == 2 and cfg.train.steps == 7


def test_empty_config_means_every_default():
    assert validate_spec(pb.JobSpec(num_nodes=1, procs_per_node=1)).model.hidden == 128


BAD = {
    "malformed toml": (
        dict(config_toml="[model\nhidden = 3"),
        "spec.config_toml",
        "not valid TOML",
    ),
    "unknown section": (dict(config_toml="[modle]\nhidden = 64"), "spec.config_toml", "[modle]"),
    "unknown key": (dict(config_toml="[model]\nhiden = 64"), "spec.config_toml", "hiden"),
    "wrong type": (dict(config_toml='[model]\nhidden = "big"'), "spec.config_toml", "type int"),
    "out of range": (dict(config_toml="[model]\ntopk = 9"), "spec.config_toml", "model.topk = 9"),
    "negative value": (dict(config_toml="[train]\nlr = -1.0"), "spec.config_toml", "train.lr"),
    "bad override syntax": (
        dict(overrides=["parallel.n"]),
        "spec.overrides[0]",
        "section.key=value",
    ),
    "override without section": (dict(overrides=["n=2"]), "spec.overrides[0]", "section.key"),
    "override unknown key": (dict(overrides=["parallel.m=2"]), "spec.overrides[0]", "unknown key"),
    "override wrong type": (dict(overrides=["parallel.n=two"]), "spec.overrides[0]", "type int"),
    "override combination": (dict(overrides=["parallel.n=3"]), "spec.overrides", "parallel.n = 3"),
    "zero nodes": (dict(num_nodes=0), "spec.num_nodes", "between 1 and"),
    "negative nodes": (dict(num_nodes=-2), "spec.num_nodes", "between 1 and"),
    "too many nodes": (dict(num_nodes=100000), "spec.num_nodes", "between 1 and"),
    "zero procs": (dict(procs_per_node=0), "spec.procs_per_node", "between 1 and"),
    "layout vs world": (dict(num_nodes=3), "spec.num_nodes", "3 nodes x 1 processes = 3 ranks"),
    "layout vs heads": (
        dict(num_nodes=4, overrides=["parallel.n=4", "model.kv_heads=2", "model.heads=4"]),
        "spec.num_nodes",
        "kv_heads",
    ),
    "oversized config": (dict(config_toml="#" * 70000), "spec.config_toml", "bytes; at most"),
    "too many overrides": (dict(overrides=["train.steps=1"] * 300), "spec.overrides", "at most"),
    "huge override": (
        dict(overrides=["data.path=" + "x" * 2000]),
        "spec.overrides[0]",
        "characters",
    ),
    "negative restarts": (
        dict(restart=pb.RestartPolicy(max_restarts=-1)),
        "spec.restart.max_restarts",
        "between",
    ),
    "nan backoff": (
        dict(restart=pb.RestartPolicy(backoff_seconds=float("nan"))),
        "spec.restart.backoff_seconds",
        "between",
    ),
    "backoff cap below start": (
        dict(restart=pb.RestartPolicy(backoff_seconds=10, max_backoff_seconds=5)),
        "spec.restart.max_backoff_seconds",
        "below",
    ),
    "unknown straggler policy": (dict(straggler=7), "spec.straggler", "not a StragglerPolicy"),
    "bad image": (dict(image="not an image!"), "spec.image", "container image"),
    "bad label key": (dict(labels={"-bad": "x"}), "spec.labels['-bad']", "keys are"),
    "long label value": (dict(labels={"team": "v" * 300}), "spec.labels['team']", "at most 256"),
    "cpu not a quantity": (
        dict(kubernetes=pb.KubernetesSettings(cpu="lots")),
        "spec.kubernetes.cpu",
        "not a Kubernetes quantity",
    ),
    "memory with a wrong unit": (
        dict(kubernetes=pb.KubernetesSettings(memory="200GB")),
        "spec.kubernetes.memory",
        "'200GB' is not a Kubernetes quantity",
    ),
    "fewer gpus than processes": (
        dict(procs_per_node=2, num_nodes=1, kubernetes=pb.KubernetesSettings(gpus=1)),
        "spec.kubernetes.gpus",
        "each process needs a GPU",
    ),
    "negative gpus": (
        dict(kubernetes=pb.KubernetesSettings(gpus=-1)),
        "spec.kubernetes.gpus",
        "between 0 and",
    ),
    "bad priority class": (
        dict(kubernetes=pb.KubernetesSettings(priority_class="High_Priority")),
        "spec.kubernetes.priority_class",
        "not a Kubernetes object name",
    ),
    "bad volume claim": (
        dict(kubernetes=pb.KubernetesSettings(volume_claim="-ckpt")),
        "spec.kubernetes.volume_claim",
        "not a Kubernetes object name",
    ),
    "bad node selector": (
        dict(kubernetes=pb.KubernetesSettings(node_selector={"pool": "h100 nodes"})),
        "spec.kubernetes.node_selector['pool']",
        "not a Kubernetes label",
    ),
    "toleration operator": (
        dict(kubernetes=pb.KubernetesSettings(tolerations=[pb.Toleration(key="a", operator="In")])),
        "spec.kubernetes.tolerations[0].operator",
        "not Equal or Exists",
    ),
    "toleration effect": (
        dict(
            kubernetes=pb.KubernetesSettings(tolerations=[pb.Toleration(key="a", effect="Never")])
        ),
        "spec.kubernetes.tolerations[0].effect",
        "NoSchedule",
    ),
    "exists with a value": (
        dict(
            kubernetes=pb.KubernetesSettings(
                tolerations=[pb.Toleration(key="a", operator="Exists", value="b")]
            )
        ),
        "spec.kubernetes.tolerations[0].value",
        "takes no value",
    ),
    "empty key without exists": (
        dict(kubernetes=pb.KubernetesSettings(tolerations=[pb.Toleration(value="b")])),
        "spec.kubernetes.tolerations[0].key",
        "operator Exists",
    ),
    "seconds without NoExecute": (
        dict(
            kubernetes=pb.KubernetesSettings(
                tolerations=[pb.Toleration(key="a", effect="NoSchedule", toleration_seconds=5)]
            )
        ),
        "spec.kubernetes.tolerations[0].toleration_seconds",
        "NoExecute",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_specs_name_the_field(kind):
    fields, field, reason = BAD[kind]
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec(**fields))
    assert err.value.field == field, str(err.value)
    assert reason in err.value.reason, str(err.value)
    code, message = status_of(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"{field}: ")


@pytest.mark.parametrize("job_id", ["", "UPPER", "-lead", "a" * 64, "has space", "dot.ted"])
def test_bad_job_ids(job_id):
    with pytest.raises(InvalidArgument, match=r"^job_id: "):
        validate_job_id(job_id)


def test_unexpected_errors_never_leak_a_traceback():
    code, message = status_of(KeyError("boom"))
    assert code == grpc.StatusCode.INTERNAL and "boom" not in message


def test_checkpointing_without_a_dir_is_completed_by_the_job_directory():
    from service.spec import JOB_CHECKPOINT_DIR, sets_checkpoint_dir

    plain = spec(overrides=["parallel.n=2", "checkpoint.interval=10"])
    assert not sets_checkpoint_dir(plain)
    assert validate_spec(plain).checkpoint.dir == JOB_CHECKPOINT_DIR  # the executor's choice
    mine = spec(overrides=["parallel.n=2", "checkpoint.interval=10", "checkpoint.dir=/ckpt"])
    assert sets_checkpoint_dir(mine) and validate_spec(mine).checkpoint.dir == "/ckpt"
    in_toml = spec(config_toml=TINY.replace('dir = ""', 'dir = "/in/toml"'))
    assert sets_checkpoint_dir(in_toml)
    emptied = spec(overrides=["parallel.n=2", "checkpoint.dir=/a", "checkpoint.dir="])
    assert not sets_checkpoint_dir(emptied)  # the last override wins


def test_pod_settings_in_kubernetes_syntax_are_accepted():
    settings = pb.KubernetesSettings(
        cpu="7500m",
        memory="200Gi",
        gpus=0,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "train"},
        tolerations=[
            pb.Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
            pb.Toleration(key="spot", value="true", effect="NoExecute", toleration_seconds=30),
            pb.Toleration(operator="Exists"),
        ],
        priority_class="training-high",
        volume_claim="shared.checkpoints",
    )
    assert validate_spec(spec(kubernetes=settings)).parallel.world == 2

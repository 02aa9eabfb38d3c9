"""What the Kubernetes executor applies and how it reads what it sees, as pure functions.

The rendered ConfigMap, headless Service and pods are compared with golden files
(tests/golden/kube/; regenerate with ``UPDATE_GOLDEN=1`` and review the diff), and the
golden files pass ``kubernetes-validate --strict`` against the real API schemas. Pod
states as the API reports them map to what the reconciler acts on.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.kube import observe_pod
from service.manifests import (
    PodDefaults,
    dns_label,
    job_label,
    job_name,
    owner_reference,
    pod_name,
    render_config_map,
    render_pod,
    render_service,
)
from trainer.errors import MegamoeError

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "kube"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
CONFIG = "[model]\nlayers = 2\n\n[checkpoint]\ninterval = 100\n"
UID = "0b7c54b4-5d36-4f0e-9d57-3f1f6b0b8a11"

# what the chart's default values make of serve.json's `kubernetes` object
CHART = PodDefaults.from_config(
    {
        "namespace": "ml",
        "release": "megamoe",
        "image": "ghcr.io/megamoe/megamoe:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": ["registry-creds"],
        "serviceAccountName": "megamoe-worker",
        "cpu": "96",
        "memory": "1600Gi",
        "gpuResource": "nvidia.com/gpu",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "",
        "volumeClaim": "megamoe-checkpoints",
        "volumeMountPath": "/mnt/megamoe",
        "metricsPort": 9500,
        "etcd": "http://megamoe-etcd:2379",
    },
    etcd="http://unused:2379",
    prefix="/megamoe",
)


def _spec(**fields) -> pb.JobSpec:
    base = dict(config_toml=CONFIG, num_nodes=2, procs_per_node=8, overrides=["parallel.n=8"])
    base.update(fields)
    return pb.JobSpec(**base)


def _owner(job_id):
    made = render_config_map(job_id, _spec(), CHART)
    made["metadata"]["uid"] = UID
    return owner_reference(made)


def _cases() -> dict[str, dict]:
    settings = pb.KubernetesSettings(
        cpu="7500m",
        memory="64Gi",
        gpus=0,
        node_selector={"pool": "cpu-large"},
        tolerations=[
            pb.Toleration(key="spot", value="yes", effect="NoExecute", toleration_seconds=60)
        ],
        priority_class="research",
        volume_claim="team-a-ckpt",
    )
    custom = _spec(
        num_nodes=4,
        procs_per_node=2,
        image="registry.example/megamoe:exp-7",
        overrides=["parallel.n=2", "checkpoint.dir=/mnt/megamoe/shared/run-7"],
        kubernetes=settings,
    )
    return {
        "configmap.yaml": render_config_map("train-42", _spec(), CHART),
        "service.yaml": render_service("train-42", CHART, _owner("train-42")),
        "pod-chart-defaults.yaml": render_pod("train-42", _spec(), 1, 0, CHART, _owner("train-42")),
        "pod-spec-settings.yaml": render_pod(
            "exp-7",
            custom,
            3,
            2,
            CHART,
            _owner("exp-7"),
            skip_checkpoints=["/mnt/megamoe/shared/run-7/step-000100@1767225600000000000"],
        ),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_rendered_manifests_equal_the_golden_files(name):
    text = yaml.safe_dump(_cases()[name], sort_keys=False, width=100)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} differs from {path} (UPDATE_GOLDEN=1 to accept)"


def test_the_golden_manifests_pass_kubernetes_validate_strict():
    files = sorted(GOLDEN.glob("*.yaml"))
    assert len(files) == len(_cases())
    res = subprocess.run(
        [str(VALIDATE), "--strict", *map(str, files)], capture_output=True, text=True, timeout=120
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "ERROR" not in out and "INVALID" not in out, out
    assert out.count(" passed for resource ") == len(files), out


def test_validate_rejects_a_broken_pod_so_the_check_above_can_fail(tmp_path):
    pod = _cases()["pod-chart-defaults.yaml"]
    pod["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # a typo of "limits"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(pod))
    res = subprocess.run(
        [str(VALIDATE), "--strict", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "limit" in res.stdout + res.stderr


def test_pods_ask_for_a_gpu_per_process_unless_the_spec_says_otherwise():
    pod = render_pod("j", _spec(), 0, 0, CHART, _owner("j"))
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "96", "memory": "1600Gi", "nvidia.com/gpu": "8"}
    assert pod["spec"]["containers"][0]["resources"]["requests"] == limits  # Guaranteed QoS
    cpu_only = render_pod(
        "j", _spec(kubernetes=pb.KubernetesSettings(gpus=0)), 0, 0, CHART, _owner("j")
    )
    assert "nvidia.com/gpu" not in cpu_only["spec"]["containers"][0]["resources"]["limits"]
    ports = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
    assert ports == list(range(9500, 9508))  # one exporter per local rank


def test_the_spec_wins_over_the_defaults_field_by_field():
    settings = pb.KubernetesSettings(memory="8Gi", priority_class="low")
    pod = render_pod("j", _spec(kubernetes=settings), 0, 0, CHART, _owner("j"))
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "96"  # default kept
    assert pod["spec"]["priorityClassName"] == "low"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_a_job_without_checkpoint_dir_checkpoints_on_the_job_volume():
    command = render_pod("j", _spec(), 0, 0, CHART, _owner("j"))["spec"]["containers"][0]["command"]
    assert "checkpoint.dir=/mnt/megamoe/jobs/j/checkpoints" in command
    assert command[command.index("--summary-json") + 1] == "/mnt/megamoe/jobs/j/summary.json"
    assert "--resume" in command


def test_long_and_odd_job_ids_get_valid_distinct_names():
    a, b = "x" * 63, "x" * 62 + "y"
    assert len(job_name(a)) <= 63 and len(job_name(b)) <= 63
    assert job_name(a) != job_name(b)
    assert dns_label("megamoe-job-trailing-") != "megamoe-job-trailing-"
    assert job_label("trailing-").endswith(dns_label("megamoe-job-trailing-")[-8:])
    assert pod_name("ok", 2, 3) == "megamoe-job-ok-g2-n3"


def test_pod_defaults_name_a_wrong_key_or_type():
    with pytest.raises(MegamoeError, match=r"kubernetes.gpus: unknown key"):
        PodDefaults.from_config({"gpus": 8}, etcd="e:1", prefix="/p")
    with pytest.raises(MegamoeError, match=r"kubernetes.metricsPort = '9500' has the wrong type"):
        PodDefaults.from_config({"metricsPort": "9500"}, etcd="e:1", prefix="/p")
    assert PodDefaults.from_config({"etcd": ""}, etcd="e:1", prefix="/p").etcd == "e:1"


def _pod(phase, state=None, **status):
    container = {"name": "worker", "state": state or {}}
    return {
        "metadata": {"name": "p"},
        "status": {"phase": phase, "containerStatuses": [container], **status},
    }


OBSERVED = {
    "pending": (_pod("Pending", {"waiting": {"reason": "ContainerCreating"}}), "running"),
    "pulling": (_pod("Pending", {"waiting": {"reason": "ErrImagePull"}}), "running"),
    "running": (_pod("Running", {"running": {}}), "running"),
    "succeeded": (_pod("Succeeded", {"terminated": {"exitCode": 0}}), "exited with code 0"),
    "failed": (
        _pod("Failed", {"terminated": {"exitCode": 1, "reason": "Error"}}),
        "exited with code 1",
    ),
    "oom": (
        _pod("Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
        "killed by SIGKILL (OOMKilled)",
    ),
    "evicted": (
        _pod(
            "Failed",
            {"terminated": {"exitCode": 137, "reason": "Error"}},
            reason="Evicted",
            message="The node was low on resource: memory.",
        ),
        "killed by SIGKILL (Evicted: The node was low on resource: memory.)",
    ),
    "evicted before start": (
        _pod("Failed", reason="Evicted", message="The node had condition: DiskPressure."),
        "ended (Evicted: The node had condition: DiskPressure.)",
    ),
    "image back-off": (
        _pod("Pending", {"waiting": {"reason": "ImagePullBackOff", "message": 'pulling "x"'}}),
        'ended (ImagePullBackOff: pulling "x")',
    ),
    "deleted": (None, "gone without an exit code (pod deleted)"),
}


@pytest.mark.parametrize("case", list(OBSERVED))
def test_what_a_pod_says_about_its_node(case):
    pod, described = OBSERVED[case]
    assert observe_pod(pod).describe() == described


def test_a_pod_the_scheduler_cannot_place_is_a_running_node_that_says_why():
    pod = _pod("Pending")
    pod["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        }
    ]
    seen = observe_pod(pod)
    assert seen.running
    assert seen.reason == "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."

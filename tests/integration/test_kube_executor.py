"""The Kubernetes executor under the real reconciler and a real etcd, through the official
`kubernetes` client against an in-process fake of the Kubernetes API at the HTTP level
(tests/fakekube.py: no API server can run here; the fake checks every object it is sent
against the real API schema and plays the kubelet's part on the test's command).

What a user would see: a job becomes one pod per node with its GPUs, owned by the job's
ConfigMap; a pod that fails or is evicted is replaced by a new generation with the cause in
the job's events; a cancel during pod creation leaves no pod; a restarted control plane
adopts the pods it finds; and the API calls made are exactly what the chart's Role allows.
"""

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.kube import KubeError, KubernetesExecutor
from service.manager import JobManager
from service.manifests import PodDefaults, job_name
from service.reconciler import Reconciler
from service.store import JobStore
from tests.fakekube import FakeKube
from trainer.elastic.etcd import Etcd
from trainer.elastic.keys import Keys

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
HELM = Path(sys.executable).parent / "helm"
TINY = (ROOT / "configs" / "tiny.toml").read_text()
NS = "ml"


@pytest.fixture
def fake():
    with FakeKube(NS) as running:
        yield running


def _executor(fake: FakeKube) -> KubernetesExecutor:
    from kubernetes import client

    config = client.Configuration()
    config.host = fake.url
    defaults = PodDefaults(
        image="registry.example/megamoe:test",
        volume_claim="shared",
        etcd="http://etcd.ml.svc:2379",
        prefix="/kube-test",
    )
    return KubernetesExecutor(client.ApiClient(config), defaults, NS)


@contextlib.contextmanager
def control_plane(etcd_server, fake, prefix):
    """A manager and a reconciler (ticking fast) with a Kubernetes executor on the fake."""
    store = JobStore(Etcd(etcd_server.endpoint), Keys(prefix))
    executor = _executor(fake)
    reconciler = Reconciler(store, executor, tick_s=0.1, grace_s=7)
    reconciler.start()
    try:
        yield JobManager(store, logs=executor.logs), executor
    finally:
        reconciler.stop()
        executor.close()


def _spec(nodes=2, procs=2, restarts=2, **kube) -> pb.JobSpec:
    spec = pb.JobSpec(
        config_toml=TINY,
        overrides=[f"parallel.n={procs}", f"parallel.dp={nodes}"],
        num_nodes=nodes,
        procs_per_node=procs,
        restart=pb.RestartPolicy(max_restarts=restarts, backoff_seconds=0),
    )
    spec.kubernetes.CopyFrom(pb.KubernetesSettings(**kube))
    return spec


def _wait(what, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pods(fake, job_id, generation=None):
    labels = {"megamoe.io/job": job_id}
    if generation is not None:
        labels["megamoe.io/generation"] = str(generation)
    return sorted(p["metadata"]["name"] for p in fake.pods(**labels))


def _state(manager, job_id):
    return manager.get(job_id).status.state


def test_a_job_runs_as_one_pod_per_node_and_succeeds(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-ok") as (manager, _):
        job = manager.create(_spec(nodes=2, procs=2, cpu="8", memory="32Gi"), "ok").job_id
        names = _wait("two pods", lambda: len(_pods(fake, job)) == 2 and _pods(fake, job))
        assert names == ["megamoe-job-ok-g0-n0", "megamoe-job-ok-g0-n1"]
        owner = fake.get("configmaps", job_name(job))
        assert owner["data"]["config.toml"] == TINY
        service = fake.get("services", job_name(job))
        assert service["spec"]["clusterIP"] == "None"
        for name in names:
            pod = fake.get("pods", name)
            assert pod["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
            (container,) = pod["spec"]["containers"]
            assert container["resources"]["limits"] == {
                "cpu": "8",
                "memory": "32Gi",
                "nvidia.com/gpu": "2",
            }
            assert "--rdzv-id=ok-g0" in container["command"]
            assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        for name in names:
            fake.run(name)
        fake.log(names[0], "step 1 loss 5.1\nstep 2 loss 4.9")
        _wait("RUNNING", lambda: _state(manager, job) == pb.RUNNING)
        tail = "".join(manager.logs(job, 0, 1, False, lambda: True))
        assert tail == "step 2 loss 4.9\n"
        for name in names:
            fake.exit(name, 0)
        _wait("SUCCEEDED", lambda: _state(manager, job) == pb.SUCCEEDED)
        # the job's Service goes with it; its pods stay (terminated) for their logs
        _wait("service deleted", lambda: fake.get("services", job_name(job)) is None)
        assert _pods(fake, job) == names


def test_a_failed_pod_is_replaced_by_a_new_generation_and_the_cause_is_an_event(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-fail") as (manager, _):
        job = manager.create(_spec(nodes=2, procs=1), "fails").job_id
        first = _wait("generation 0", lambda: len(_pods(fake, job, 0)) == 2 and _pods(fake, job, 0))
        for name in first:
            fake.run(name)
        fake.log(first[1], "loading data\nmegamoe: error: data.path: no such corpus")
        fake.exit(first[1], 1, message="megamoe: error: data.path: no such corpus")
        second = _wait(
            "generation 1", lambda: len(_pods(fake, job, 1)) == 2 and _pods(fake, job, 1)
        )
        assert second == ["megamoe-job-fails-g1-n0", "megamoe-job-fails-g1-n1"]
        # the rest of the old world was deleted with the control plane's grace period; the
        # failed pod holds nothing and stays for its log
        assert ("pods", first[0], 7) in fake.deleted
        assert _pods(fake, job, 0) == [first[1]]
        log = "".join(manager.logs(job, 1, 0, False, lambda: True))
        assert log.startswith(f"=== megamoe: pod {first[1]} (generation 0) ===\nloading data\n")
        assert log.endswith(f"=== megamoe: pod {second[1]} (generation 1) ===\n")
        pod = fake.get("pods", second[0])
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MEGAMOE_GENERATION"] == "1"
        assert "--rdzv-id=fails-g1" in pod["spec"]["containers"][0]["command"]
        status = manager.get(job).status
        assert (status.restarts, status.generation) == (1, 1)
        exited = [e for e in manager.store.events(job, 0) if e.type == "node_exited"]
        assert "node 1" in exited[0].message and "code 1" in exited[0].message
        assert "megamoe: error: data.path: no such corpus" in exited[0].message


def test_an_evicted_pod_is_replaced_and_the_eviction_named(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-evict") as (manager, _):
        job = manager.create(_spec(nodes=2, procs=1), "evicted").job_id
        first = _wait("generation 0", lambda: len(_pods(fake, job, 0)) == 2 and _pods(fake, job, 0))
        for name in first:
            fake.run(name)
        fake.evict(first[0], "The node was low on resource: memory.")
        _wait("generation 1", lambda: len(_pods(fake, job, 1)) == 2)
        exited = [e for e in manager.store.events(job, 0) if e.type == "node_exited"]
        assert "Evicted: The node was low on resource: memory." in exited[0].message
        assert manager.get(job).status.restarts == 1


def test_an_image_that_cannot_be_pulled_fails_the_job_naming_the_image_error(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-image") as (manager, _):
        job = manager.create(_spec(nodes=1, procs=1, restarts=0), "noimage").job_id
        (name,) = _wait("a pod", lambda: _pods(fake, job))
        fake.wait_image(name, "ImagePullBackOff", 'Back-off pulling image "registry/typo"')
        _wait("FAILED", lambda: _state(manager, job) == pb.FAILED)
        message = manager.get(job).status.message
        assert 'ImagePullBackOff: Back-off pulling image "registry/typo"' in message


def test_a_pod_that_cannot_be_scheduled_shows_in_the_jobs_message(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-sched") as (manager, _):
        job = manager.create(_spec(nodes=1, procs=4), "big").job_id
        (name,) = _wait("a pod", lambda: _pods(fake, job))
        why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
        fake.unschedulable(name, why)
        _wait("the reason", lambda: why in manager.get(job).status.message)
        status = manager.get(job).status
        assert status.state == pb.RUNNING and status.restarts == 0
        assert status.message == f"node 0 waiting: Unschedulable: {why}"
        fake.run(name)
        _wait("the reason gone", lambda: manager.get(job).status.message == "")


def test_cancel_during_pod_creation_leaves_no_pod_and_cancel_again_is_harmless(etcd_server, fake):
    fake.create_delay_s = 0.4  # a slow API server: the job is cancelled mid-creation
    with control_plane(etcd_server, fake, "/k-cancel") as (manager, _):
        job = manager.create(_spec(nodes=4, procs=1), "cancelled").job_id
        assert fake.create_started.wait(10)
        manager.cancel(job)
        _wait("CANCELLED", lambda: _state(manager, job) == pb.CANCELLED)
        _wait("no pod left", lambda: _pods(fake, job) == [])
        again = manager.cancel(job)
        assert again.status.state == pb.CANCELLED
        assert _pods(fake, job) == []


def test_follow_streams_a_pods_new_output_until_it_ends(etcd_server, fake):
    with control_plane(etcd_server, fake, "/k-logs") as (manager, executor):
        job = manager.create(_spec(nodes=1, procs=1), "logs").job_id
        (name,) = _wait("a pod", lambda: _pods(fake, job))
        fake.run(name)
        fake.log(name, "first")
        _wait("running", lambda: executor.poll(job, 0, _handle(name)).running)
        got: list[str] = []

        def follow():
            got.extend(executor.logs(job, 0, 0, True, lambda: True))

        reader = threading.Thread(target=follow)
        reader.start()
        _wait("first line", lambda: got == ["first\n"])
        fake.log(name, "second\nthird")
        _wait("new lines", lambda: len(got) == 3)
        fake.exit(name, 0)
        reader.join(timeout=20)
        assert not reader.is_alive()
        assert got == ["first\n", "second\n", "third\n"]


def test_a_busy_api_server_is_asked_again_and_a_refusal_is_not(fake):
    executor = _executor(fake)
    try:
        fake.failures = [503, 500]
        handle = executor.start_node("busy", _spec(nodes=1, procs=1), 0, 0)
        assert fake.get("pods", handle.pod) is not None
        assert fake.requests.count(("create", "pods")) == 3
        fake.failures = [403]
        with pytest.raises(KubeError, match=r"creating pod megamoe-job-busy-g1-n0 .*: 403"):
            executor.start_node("busy", _spec(nodes=1, procs=1), 0, 1)
        assert fake.requests.count(("create", "pods")) == 4
    finally:
        executor.close()


def _handle(name):
    from service.executor import NodeHandle

    return NodeHandle(pod=name)


def _chart_role() -> set[tuple[str, str]]:
    """(verb, resource) pairs the chart's Role grants."""
    res = subprocess.run(
        [str(HELM), "template", "mm", str(ROOT / "helm" / "megamoe"), "--namespace", NS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    (role,) = [d for d in yaml.safe_load_all(res.stdout) if d and d.get("kind") == "Role"]
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule
        for resource in rule["resources"]:
            granted |= {(verb, resource) for verb in rule["verbs"]}
    return granted


def test_a_restarted_control_plane_adopts_its_pods_and_calls_only_what_the_role_grants(
    etcd_server, fake
):
    """One job through every path of the executor: created, logs read and followed, the
    control plane restarted (pods adopted, none created), a pod deleted by hand (replaced),
    a pod failing without a termination message (its log read), a cancel. The API calls it
    made, as RBAC sees them, must be exactly the chart's Role: nothing missing, nothing
    extra."""
    spec = _spec(nodes=1, procs=1, restarts=5)
    with control_plane(etcd_server, fake, "/k-role") as (manager, executor):
        job = manager.create(spec, "role").job_id
        (g0,) = _wait("a pod", lambda: _pods(fake, job))
        fake.run(g0)
        fake.log(g0, "hello")
        _wait("running", lambda: executor.poll(job, 0, _handle(g0)).running)
        assert "".join(manager.logs(job, 0, 5, False, lambda: True)) == "hello\n"
        followed = []
        stop_following = threading.Event()
        reader = threading.Thread(
            target=lambda: followed.extend(
                manager.logs(job, 0, 0, True, lambda: not stop_following.is_set())
            )
        )
        reader.start()
        _wait("followed", lambda: followed == ["hello\n"])
    created = len([r for r in fake.requests if r == ("create", "pods")])

    with control_plane(etcd_server, fake, "/k-role") as (manager, executor):
        time.sleep(0.5)  # a few ticks: the adopted pod is left alone
        assert len([r for r in fake.requests if r == ("create", "pods")]) == created
        assert _state(manager, job) == pb.RUNNING
        fake.delete_pod(g0)  # by hand: gone without an exit code
        (g1,) = _wait("generation 1", lambda: _pods(fake, job, 1))
        fake.run(g1)
        fake.log(g1, "Traceback (most recent call last):\nRuntimeError: NCCL timeout")
        fake.exit(g1, 1)
        _wait("generation 2", lambda: _pods(fake, job, 2))
        exited = [e for e in manager.store.events(job, 0) if e.type == "node_exited"]
        assert "gone without an exit code" in exited[0].message
        assert "RuntimeError: NCCL timeout" in exited[1].message
        manager.cancel(job)
        _wait("CANCELLED", lambda: _state(manager, job) == pb.CANCELLED)
        _wait("service deleted", lambda: fake.get("services", job_name(job)) is None)
        stop_following.set()
        fake.exit(g0, 0) if fake.get("pods", g0) else None
        reader.join(timeout=30)

    used = set(fake.requests)
    assert used == _chart_role(), (
        f"missing from the Role: {sorted(used - _chart_role())}; "
        f"granted but unused: {sorted(_chart_role() - used)}"
    )


def test_serve_with_the_kubernetes_executor_runs_a_submitted_job_on_the_fake(
    etcd_server, fake, tmp_path
):
    """`megamoe serve --config serve.json` (the chart's way) with a kubeconfig that points
    at the fake: a job submitted with the CLI becomes pods carrying the chart's defaults."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "c", "context": {"cluster": "fake", "user": "u", "namespace": NS}}
                ],
                "current-context": "c",
            }
        )
    )
    config = tmp_path / "serve.json"
    config.write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": 0,
                "etcd": etcd_server.endpoint,
                "prefix": "/k-serve",
                "stateDir": str(tmp_path / "state"),
                "executor": "kubernetes",
                "kubernetes": {
                    "release": "prod",
                    "image": "registry.example/megamoe:1",
                    "nodeSelector": {"pool": "h100"},
                    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "priorityClassName": "training",
                    "volumeClaim": "ckpt",
                },
            }
        )
    )
    from tests.integration.conftest import running_serve

    env = {"KUBECONFIG": str(kubeconfig)}
    with running_serve(tmp_path / "state", "--config", str(config), env=env) as (_, address):
        res = subprocess.run(
            [
                *(sys.executable, "-m", "service.cli", "job", "submit", "--server", address),
                *("--config", "configs/tiny.toml", "--nodes", "1", "--procs-per-node", "1"),
                *("--set", "parallel.n=1", "--set", "parallel.dp=1", "--id", "viaserve"),
                *("--gpus", "0", "--memory", "16Gi"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr
        (name,) = _wait("a pod", lambda: _pods(fake, "viaserve"))
        pod = fake.get("pods", name)
        assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
        assert pod["spec"]["nodeSelector"] == {"pool": "h100"}
        assert pod["spec"]["tolerations"] == [
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert pod["spec"]["priorityClassName"] == "training"
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "registry.example/megamoe:1"
        assert container["resources"]["limits"] == {"memory": "16Gi"}  # --gpus 0: no GPU
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["ckpt"]
        fake.run(name)
        fake.exit(name, 0)
        _wait_cli_state(address, "viaserve", "SUCCEEDED")


def _wait_cli_state(address, job_id, state):
    def done():
        res = subprocess.run(
            [sys.executable, "-m", "service.cli", "job", "get", job_id, "--server", address],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        return res.returncode == 0 and f"{job_id}: {state}" in res.stdout

    _wait(state, done, timeout=60)

"""The helm chart helm/megamoe, rendered offline by the real helm binary (scripts/install_helm.py
puts it beside the interpreter; `make test` does that first).

Two values sets are rendered once each: the defaults, and ci/monitoring-external-values.yaml
with the Prometheus Operator API versions declared. For both: `helm lint --strict` passes and
every manifest validates against the Kubernetes API schemas (kubernetes-validate --strict, so
an unknown field fails). Then the objects themselves: etcd in the chart or not, the checkpoint
claim created or reused, the monitors only where their CRDs exist, serve.json with exactly the
keys `megamoe serve --config` reads (and accepted by it), hardened pods, the exact RBAC rules,
the dashboard ConfigMap, and values.yaml / values.schema.json (every value documented with a
`# --` comment, wrong values rejected, the table of docs/deploy.md in step). Where the chart
meets the control plane's code, that code is used: serve.json goes through `megamoe serve`'s
config reader and the executor's pod defaults, and a worker pod the executor renders from it
is checked against the chart's PodMonitor and worker ServiceAccount.
"""

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "megamoe"
CI_VALUES = CHART / "ci" / "monitoring-external-values.yaml"
HELM = Path(sys.executable).parent / "helm"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"

RELEASE = "mm"
NAMESPACE = "training"
FULLNAME = "mm-megamoe"
MONITORING_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}

SERVE_KEYS = {
    "host",
    "port",
    "etcd",
    "prefix",
    "stateDir",
    "tokenFile",
    "executor",
    "metricsPort",
    "metricsHost",
    "kubernetes",
}
KUBERNETES_KEYS = {
    "namespace",
    "release",
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "serviceAccountName",
    "cpu",
    "memory",
    "gpuResource",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
    "volumeClaim",
    "volumeMountPath",
    "metricsPort",
    "etcd",
}
ROLE_RULES = [
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["create", "delete", "get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get"]},
]


def run(cmd: list, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def helm(*args) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"no helm at {HELM}: run `make helm` (scripts/install_helm.py {HELM})")
    return run([HELM, *args])


def template(*args) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *args)


class Render:
    """One `helm template` output: its text and its objects."""

    def __init__(self, *args: str) -> None:
        res = template(*args)
        assert res.returncode == 0, res.stderr
        self.args = args
        self.text = res.stdout
        self.docs = [d for d in yaml.safe_load_all(res.stdout) if d]

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} in {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]

    def serve_json(self) -> dict:
        return json.loads(self.get("ConfigMap", f"{FULLNAME}-config")["data"]["serve.json"])

    def pod_templates(self) -> list[tuple[str, dict]]:
        """(kind/name, pod template) of every object that makes pods."""
        found = []
        for d in self.docs:
            name = f"{d['kind']}/{d['metadata']['name']}"
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
                found.append((name, d["spec"]["template"]))
            elif d["kind"] == "CronJob":
                found.append((name, d["spec"]["jobTemplate"]["spec"]["template"]))
            elif d["kind"] == "Pod":
                found.append((name, d))
        return found


@pytest.fixture(scope="module")
def default() -> Render:
    return Render()


@pytest.fixture(scope="module")
def ci() -> Render:
    apis = [a for api in MONITORING_APIS for a in ("--api-versions", api)]
    return Render("-f", str(CI_VALUES), *apis)


@pytest.fixture(params=["default", "ci"])
def rendered(request) -> Render:
    return request.getfixturevalue(request.param)


# -- lint and API schemas -------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", str(CI_VALUES)]], ids=["default", "ci"])
def test_helm_lint_strict_passes(values):
    res = helm("lint", "--strict", CHART, "--namespace", NAMESPACE, *values)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout
    assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout


def test_every_manifest_validates_against_the_kubernetes_api_schemas(rendered, tmp_path):
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(rendered.text)
    res = run([VALIDATE, "--strict", manifests])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "ERROR" not in out and "INVALID" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    passed = [line for line in lines if line.startswith("INFO") and " passed for resource " in line]
    warned = [line for line in lines if line.startswith("WARN")]
    # every built-in object passed; only the Prometheus Operator kinds have no schema
    builtin = [d for d in rendered.docs if d["kind"] not in MONITORING_KINDS]
    assert len(passed) == len(builtin), out
    assert len(warned) == len(rendered.docs) - len(builtin), out
    assert all("monitoring.coreos.com/v1" in line for line in warned), out
    assert len(lines) == len(passed) + len(warned), out


def test_the_validator_rejects_an_unknown_field(default, tmp_path):
    """The check above can fail: --strict reports a field the API does not have."""
    bad = default.text.replace("enableServiceLinks: false", "enableServiceLinks: false\n      x: 1")
    assert bad != default.text
    (tmp_path / "bad.yaml").write_text(bad)
    res = run([VALIDATE, "--strict", tmp_path / "bad.yaml"])
    assert res.returncode != 0 and "ERROR" in res.stdout + res.stderr


# -- what each values set renders -----------------------------------------------------------


def test_default_render_runs_a_three_member_etcd_and_creates_the_checkpoint_claim(default):
    sts = default.get("StatefulSet", f"{FULLNAME}-etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == f"{FULLNAME}-etcd-headless"
    etcd = sts["spec"]["template"]["spec"]["containers"][0]
    assert etcd["image"] == "quay.io/coreos/etcd:v3.6.5"
    domain = f"{FULLNAME}-etcd-headless.{NAMESPACE}.svc"
    members = ",".join(
        f"{FULLNAME}-etcd-{i}=http://{FULLNAME}-etcd-{i}.{domain}:2380" for i in range(3)
    )
    assert f"--initial-cluster={members}" in etcd["args"]
    assert "--data-dir=/var/lib/etcd/data" in etcd["args"]
    assert {"name": "data", "mountPath": "/var/lib/etcd"} in etcd["volumeMounts"]
    assert etcd["readinessProbe"]["httpGet"] == {"path": "/health", "port": "client"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "storageClassName" not in claim["spec"]

    headless = default.get("Service", f"{FULLNAME}-etcd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {(p["name"], p["port"]) for p in headless["spec"]["ports"]} == {
        ("client", 2379),
        ("peer", 2380),
    }
    client = default.get("Service", f"{FULLNAME}-etcd")
    assert [(p["name"], p["port"]) for p in client["spec"]["ports"]] == [("client", 2379)]
    pdb = default.get("PodDisruptionBudget", f"{FULLNAME}-etcd")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]

    pvc = default.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    assert not MONITORING_KINDS & set(default.kinds())  # no CRDs declared: no monitors
    config = default.serve_json()
    assert config["etcd"] == config["kubernetes"]["etcd"] == f"http://{FULLNAME}-etcd:2379"
    assert config["kubernetes"]["volumeClaim"] == f"{FULLNAME}-checkpoints"


def test_default_render_creates_a_random_token_secret(default):
    secret = default.get("Secret", f"{FULLNAME}-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 32 and token.isalnum()
    deployment = default.get("Deployment", FULLNAME)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == f"{FULLNAME}-token"
    assert volumes["token"]["secret"]["items"] == [{"key": "token", "path": "token"}]


def test_ci_render_uses_the_external_etcd_and_the_existing_claim(ci):
    assert not ci.all("StatefulSet") and not ci.all("PodDisruptionBudget")
    assert not [n for n in ci.names() if "etcd" in n], ci.names()
    assert not ci.all("PersistentVolumeClaim")
    assert not ci.all("Secret")  # auth.existingSecret
    config = ci.serve_json()
    assert config["etcd"] == config["kubernetes"]["etcd"] == "http://etcd.example.svc:2379"
    assert config["prefix"] == "/megamoe-ci"
    kube = config["kubernetes"]
    assert kube["volumeClaim"] == "shared-checkpoints"
    assert kube["volumeMountPath"] == "/mnt/shared"
    values = yaml.safe_load(CI_VALUES.read_text())
    assert kube["nodeSelector"] == values["workers"]["nodeSelector"]
    assert kube["tolerations"] == values["workers"]["tolerations"]
    assert kube["priorityClassName"] == "training-high"
    assert kube["image"] == values["workers"]["image"]
    assert (kube["cpu"], kube["memory"], kube["metricsPort"]) == ("96", "1800Gi", 9600)
    assert kube["imagePullSecrets"] == ["registry-example"]
    assert kube["imagePullPolicy"] == "Always"

    deployment = ci.get("Deployment", FULLNAME)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/megamoe:0.1.0-rc1"
    assert pod["imagePullSecrets"] == [{"name": "registry-example"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "megamoe-api-token"
    assert volumes["token"]["secret"]["items"] == [{"key": "api-token", "path": "token"}]


def test_ci_render_has_the_monitors(ci):
    sm = ci.get("ServiceMonitor", FULLNAME)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    metrics = ci.get("Service", f"{FULLNAME}-metrics")
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9400)]
    labels = metrics["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    pm = ci.get("PodMonitor", f"{FULLNAME}-workers")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # the labels the Kubernetes executor puts on worker pods
    assert pm["spec"]["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "megamoe",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "worker",
        }
    }
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert "port" not in endpoint and "targetPort" not in endpoint
    assert endpoint["interval"] == "30s"
    assert endpoint["relabelings"] == [
        {
            "sourceLabels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": "metrics-.*",
            "action": "keep",
        }
    ]


def test_monitors_need_both_the_flag_and_the_crds():
    only_sm = Render("--api-versions", MONITORING_APIS[0])
    assert "ServiceMonitor" in only_sm.kinds() and "PodMonitor" not in only_sm.kinds()
    apis = [a for api in MONITORING_APIS for a in ("--api-versions", api)]
    off = Render("--set", "monitoring.enabled=false", *apis)
    assert not MONITORING_KINDS & set(off.kinds())


@pytest.mark.parametrize("replicas", [1, 5])
def test_the_initial_cluster_follows_the_replica_count(replicas):
    r = Render("--set", f"etcd.replicas={replicas}", "--set", "etcd.persistence.storageClass=-")
    sts = r.get("StatefulSet", f"{FULLNAME}-etcd")
    assert sts["spec"]["replicas"] == replicas
    (arg,) = [
        a
        for a in sts["spec"]["template"]["spec"]["containers"][0]["args"]
        if "--initial-cluster=" in a
    ]
    members = arg.removeprefix("--initial-cluster=").split(",")
    assert [m.split("=")[0] for m in members] == [f"{FULLNAME}-etcd-{i}" for i in range(replicas)]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""
    assert bool(r.all("PodDisruptionBudget")) == (replicas > 1)


# -- serve.json -----------------------------------------------------------------------------


def test_serve_json_has_exactly_the_keys_megamoe_serve_reads(rendered):
    config = rendered.serve_json()
    assert set(config) == SERVE_KEYS
    assert set(config["kubernetes"]) == KUBERNETES_KEYS
    assert config["host"] == config["metricsHost"] == "0.0.0.0"
    assert (config["port"], config["metricsPort"]) == (50051, 9400)
    assert config["stateDir"] == "/var/lib/megamoe/state"
    assert config["tokenFile"] == "/etc/megamoe/token/token"
    assert config["executor"] == "kubernetes"
    kube = config["kubernetes"]
    assert (kube["namespace"], kube["release"]) == (NAMESPACE, RELEASE)
    assert kube["serviceAccountName"] == f"{FULLNAME}-worker"
    assert kube["gpuResource"] == "nvidia.com/gpu"
    assert all(isinstance(kube[k], str) for k in ("cpu", "memory", "priorityClassName"))
    assert isinstance(kube["metricsPort"], int)


def test_default_serve_json_values(default):
    kube = default.serve_json()["kubernetes"]
    assert kube["image"] == "ghcr.io/megamoe/megamoe:0.1.0"  # the control plane's image
    assert (kube["cpu"], kube["memory"], kube["metricsPort"]) == ("16", "200Gi", 9500)
    assert (kube["nodeSelector"], kube["tolerations"], kube["priorityClassName"]) == ({}, [], "")
    assert kube["imagePullSecrets"] == []
    assert kube["volumeMountPath"] == "/mnt/megamoe"
    assert default.serve_json()["prefix"] == "/megamoe"


def test_without_auth_there_is_no_token():
    r = Render("--set", "auth.enabled=false")
    config = r.serve_json()
    assert set(config) == SERVE_KEYS - {"tokenFile"}
    assert not r.all("Secret")
    pod = r.get("Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert "token" not in {v["name"] for v in pod["volumes"]}
    assert "token" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}


def test_megamoe_serve_accepts_the_rendered_serve_json(rendered, tmp_path):
    """The file goes through the control plane's own readers: `megamoe serve --config` and
    the Kubernetes executor's pod defaults (both reject unknown keys and wrong types)."""
    from service.manifests import PodDefaults
    from service.serve import load_options

    path = tmp_path / "serve.json"
    path.write_text(json.dumps(rendered.serve_json()))
    options = load_options(str(path), {})
    assert options.executor == "kubernetes"
    assert options.namespace == NAMESPACE
    kube = rendered.serve_json()["kubernetes"]
    assert options.kubernetes == kube
    defaults = PodDefaults.from_config(options.kubernetes, options.etcd, options.prefix)
    assert defaults.volume_claim == kube["volumeClaim"]
    assert defaults.service_account_name == f"{FULLNAME}-worker"
    assert defaults.release == RELEASE


# -- the control plane ----------------------------------------------------------------------


def test_the_control_plane_deployment(default):
    deployment = default.get("Deployment", FULLNAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/megamoe/megamoe:0.1.0"
    assert container["args"] == ["serve", "--config", "/etc/megamoe/serve.json"]
    assert "command" not in container  # the image's ENTRYPOINT is megamoe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/megamoe": "config",
        "/etc/megamoe/token": "token",
        "/var/lib/megamoe/state": "state",
        "/tmp": "tmp",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == f"{FULLNAME}-config"
    assert volumes["config"]["configMap"]["items"] == [{"key": "serve.json", "path": "serve.json"}]
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}

    api = default.get("Service", FULLNAME)
    assert api["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in api["spec"]["ports"]] == [
        ("grpc", 50051, "grpc")
    ]
    selector = api["spec"]["selector"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"] == selector


def test_a_config_change_rolls_the_control_plane(default):
    annotations = default.get("Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]
    text = default.get("ConfigMap", f"{FULLNAME}-config")["data"]["serve.json"]
    assert annotations["checksum/config"] == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    other = Render("--set", "workers.priorityClassName=urgent")
    changed = other.get("Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]
    assert changed["checksum/config"] != annotations["checksum/config"]


def test_standard_labels_on_every_object(rendered):
    for doc in rendered.docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "megamoe", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "megamoe-0.1.0"
        assert labels["app.kubernetes.io/component"]


# -- security -------------------------------------------------------------------------------


def test_every_pod_is_hardened(rendered):
    templates = rendered.pod_templates()
    expected = {"Deployment/" + FULLNAME}
    if "StatefulSet" in rendered.kinds():
        expected.add(f"StatefulSet/{FULLNAME}-etcd")
    assert {name for name, _ in templates} == expected
    for name, template in templates:
        pod = template["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True, name
        assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == 10001, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        containers = pod["containers"] + pod.get("initContainers", [])
        for container in containers:
            where = f"{name} container {container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged"), where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where


def test_the_role_has_exactly_the_rules_the_executor_needs(rendered):
    (role,) = rendered.all("Role")
    assert role["metadata"]["name"] == FULLNAME
    assert role["rules"] == ROLE_RULES
    assert not rendered.all("ClusterRole") and not rendered.all("ClusterRoleBinding")
    (binding,) = rendered.all("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]


def test_workers_get_a_service_account_without_an_api_token(rendered):
    control = rendered.get("ServiceAccount", FULLNAME)
    assert control.get("automountServiceAccountToken", True) is True
    worker = rendered.get("ServiceAccount", f"{FULLNAME}-worker")
    assert worker["automountServiceAccountToken"] is False
    assert rendered.serve_json()["kubernetes"]["serviceAccountName"] == f"{FULLNAME}-worker"


# -- dashboard ------------------------------------------------------------------------------


def test_the_dashboard_configmap_is_the_generated_json(rendered):
    cm = rendered.get("ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = json.loads((CHART / "dashboards" / "megamoe.json").read_text())
    assert json.loads(cm["data"]["megamoe.json"]) == expected


def test_the_dashboard_folder_annotation(default, ci):
    assert "annotations" not in default.get("ConfigMap", f"{FULLNAME}-dashboard")["metadata"]
    annotations = ci.get("ConfigMap", f"{FULLNAME}-dashboard")["metadata"]["annotations"]
    assert annotations == {"grafana_folder": "Training"}
    off = Render("--set", "grafana.dashboard.enabled=false")
    assert f"ConfigMap/{FULLNAME}-dashboard" not in off.names()


# -- values.yaml and values.schema.json -----------------------------------------------------


def _keys(node, path=()):
    """(path, line) of every mapping key under ``node`` (a PyYAML node), lists included."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield (*path, key.value), key.start_mark.line
            yield from _keys(value, (*path, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _keys(item, (*path, i))


def test_every_value_has_a_doc_comment():
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    keys = list(_keys(yaml.compose(text)))
    assert len(keys) > 50
    undocumented = []
    for path, line in keys:
        if any(isinstance(p, int) for p in path):
            continue  # a key of a list item (a default toleration, ...) is data, not a value
        comment = []
        i = line - 1
        while i >= 0 and lines[i].lstrip().startswith("#"):
            comment.append(lines[i].strip())
            i -= 1
        if not any(c.startswith("# -- ") and len(c) > 10 for c in comment):
            undocumented.append(".".join(path))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_the_schema_describes_values_yaml():
    """values.schema.json (draft-07) accepts values.yaml and the CI values, has a property for
    every value, and closes every object it defines."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for values in (CHART / "values.yaml", CI_VALUES):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(values.read_text()))]
        assert not errors, f"{values.name}: {errors}"

    def walk(values: dict, props: dict, path: str):
        assert props.get("additionalProperties") is False, f"{path or 'top level'} is open"
        for key, value in values.items():
            assert key in props["properties"], f"{path}{key} is not in the schema"
            sub = props["properties"][key]
            if sub.get("type") == "object" and "properties" in sub:
                walk(value, sub, f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


@pytest.mark.parametrize(
    "setting",
    [
        "etcd.replicas=zero",
        "etcd.replicas=2",
        "etcd.replicas=0",
        "image.pullPolicy=Sometimes",
        "service.port=70000",
        "workers.metricsPort=0",
        "etcd.external.endpoint=not a url",
        "monitoring.interval=often",
        "checkpoints.accessModes[0]=ReadWriteSometimes",
        "no.such.value=1",
    ],
)
def test_the_schema_rejects_a_wrong_value(setting):
    res = template("--set", setting)
    assert res.returncode != 0, f"--set {setting} rendered"
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr


def _leaves(values: dict, path: str = ""):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{path}{key}.")
        else:
            yield f"{path}{key}", value


def test_the_values_table_of_docs_deploy_md_matches_values_yaml():
    """docs/deploy.md lists every value of values.yaml with its default, and nothing else."""
    doc = (ROOT / "docs" / "deploy.md").read_text().split("\n## Values\n", 1)[1]
    table = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            table[cells[0].strip("`")] = yaml.safe_load(cells[1].strip("`"))
    leaves = dict(_leaves(yaml.safe_load((CHART / "values.yaml").read_text())))
    assert sorted(table) == sorted(leaves)
    wrong = {k: (table[k], v) for k, v in leaves.items() if table[k] != v}
    assert not wrong, f"docs/deploy.md defaults (doc, values.yaml): {wrong}"


def test_object_names_for_the_release_names_of_docs_deploy_md():
    """`helm install megamoe ...` names the objects as docs/deploy.md says; a long release name
    is shortened so that every name stays a valid DNS label."""
    res = helm("template", "megamoe", CHART, "--namespace", "megamoe")
    assert res.returncode == 0, res.stderr
    names = {f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(res.stdout) if d}
    assert {
        "Deployment/megamoe",
        "Service/megamoe",
        "Service/megamoe-metrics",
        "Secret/megamoe-token",
        "ServiceAccount/megamoe-worker",
        "PersistentVolumeClaim/megamoe-checkpoints",
        "StatefulSet/megamoe-etcd",
        "Service/megamoe-etcd-headless",
        "ConfigMap/megamoe-dashboard",
    } <= names

    long = "a-very-long-release-name-for-a-training-cluster-x"  # 49 characters
    res = helm("template", long, CHART, "--namespace", "megamoe")
    assert res.returncode == 0, res.stderr
    for doc in yaml.safe_load_all(res.stdout):
        if doc:
            name = doc["metadata"]["name"]
            limit = 52 if doc["kind"] == "StatefulSet" else 63  # pod names add "-<index>"
            assert len(name) <= limit and not name.endswith("-"), name


def test_the_pod_monitor_selects_the_worker_pods_the_executor_renders(ci):
    """A worker pod rendered by the Kubernetes executor from this serve.json carries the
    PodMonitor's labels, one `metrics-<rank>` port per process, the chart's worker
    ServiceAccount and the checkpoint claim."""
    from service._gen.megamoe.v1 import jobs_pb2 as pb
    from service.manifests import PodDefaults, owner_reference, render_config_map, render_pod

    config = ci.serve_json()
    defaults = PodDefaults.from_config(config["kubernetes"], config["etcd"], config["prefix"])
    spec = pb.JobSpec(
        config_toml=(ROOT / "configs" / "tiny.toml").read_text(), num_nodes=2, procs_per_node=4
    )
    parent = render_config_map("j1", spec, defaults)
    parent["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    pod = render_pod("j1", spec, 1, 0, defaults, owner_reference(parent))

    monitor = ci.get("PodMonitor", f"{FULLNAME}-workers")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    (keep,) = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    (container,) = pod["spec"]["containers"]
    ports = [p["name"] for p in container["ports"] if re.fullmatch(keep["regex"], p["name"])]
    assert ports == [f"metrics-{i}" for i in range(4)]
    assert pod["spec"]["serviceAccountName"] == f"{FULLNAME}-worker"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["shared-checkpoints"]
    assert container["workingDir"] == "/mnt/shared"


def test_a_release_whose_names_would_clash_with_job_objects_is_refused():
    """Job objects are named megamoe-job-<id>; a release named like that could share a
    name with them (a job's ConfigMap deleted would take the chart's along)."""
    res = helm("template", "megamoe-job-runner", CHART, "--namespace", "megamoe")
    assert res.returncode != 0
    assert "names starting with megamoe-job- belong to the jobs" in res.stderr

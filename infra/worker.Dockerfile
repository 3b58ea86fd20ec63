# actcache worker: Python, every package of infra/requirements.lock (constraints.txt's versions, the Makefile's torch),
# each checked against its sha256, and this project at /opt/actcache; runs as the unprivileged user `actcache`.
# The base image is pinned by digest, and the build refuses to start without one. From the repository root
# (infra/README.md; compose passes these from infra/.env):
#   docker build -f infra/worker.Dockerfile --build-arg BASE_DIGEST=sha256:... -t actcache-worker:cpu .
#   docker build -f infra/worker.Dockerfile --build-arg BASE_DIGEST=sha256:... \
#       --build-arg LOCK=infra/requirements-cuda.lock -t actcache-worker:cuda .
# The digest of the tag below: `docker buildx imagetools inspect python:3.11.14-slim-bookworm` (its first line).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
# No default: an unpinned build is refused (FROM with an empty digest is not a valid reference).
ARG BASE_DIGEST
FROM ${BASE_IMAGE}@${BASE_DIGEST}

# Which lock: infra/requirements.lock (torch's CPU build, from PyTorch's CPU index) or infra/requirements-cuda.lock
# (`python3 infra/lock.py --cuda`: PyPI's torch, the CUDA build, with its nvidia-* wheels; the driver comes from
# the host through the NVIDIA container toolkit).
ARG LOCK=infra/requirements.lock
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/cache/huggingface \
    ACTCACHE_CACHE_DIR=/cache/actcache \
    ACTCACHE_HOME=/opt/actcache

# Everything but the project, before copying the source: a code change rebuilds only the last layers.
COPY ${LOCK} /tmp/requirements.lock
RUN pip install --require-hashes --no-deps --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock

WORKDIR /opt/actcache
COPY . /opt/actcache
# The project alone: its dependencies are all above (pip check says so); the deployments' pull step runs flows
# from ACTCACHE_HOME.
RUN pip install --no-deps --no-build-isolation --no-index /opt/actcache \
 && pip check \
 && actcache --help > /dev/null \
 && useradd --create-home --uid 10001 --user-group actcache \
 && mkdir -p /cache \
 && chown actcache:actcache /cache
# The cache volume takes /cache's owner when first mounted; on Kubernetes, fsGroup 10001 (infra/k8s).
USER 10001:10001

# One flow run at a time: on a GPU machine, one worker per GPU (CUDA_VISIBLE_DEVICES).
CMD ["prefect", "worker", "start", "--pool", "actcache", "--type", "process", "--limit", "1"]

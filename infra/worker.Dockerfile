# actcache worker: Python, torch 2.13.0 (the tested version) and this project at /opt/actcache, every other package at
# the version of constraints.txt. Build from the repository root (infra/README.md):
#   docker build -f infra/worker.Dockerfile -t actcache-worker:cpu .
#   docker build -f infra/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t actcache-worker:cuda .
FROM python:3.11.14-slim-bookworm

ARG TORCH_VERSION=2.13.0
# Where torch comes from. PyTorch's CPU index (default, small); PyPI, whose Linux wheel is the CUDA build (CUDA
# runtime, cuDNN and NCCL come as nvidia-* wheels; the driver comes from the host through the NVIDIA container
# toolkit); or a PyTorch CUDA index for another CUDA version, e.g. https://download.pytorch.org/whl/cu130.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/cache/huggingface \
    ACTCACHE_CACHE_DIR=/cache/actcache \
    ACTCACHE_HOME=/opt/actcache

# torch first, from its index: the project's bare `torch` requirement would otherwise pick whatever PyPI has.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/actcache
COPY . /opt/actcache
# constraints.txt: what the test suite passed with; /tmp/torch.txt keeps the torch installed above. The
# deployments' pull step runs flows from ACTCACHE_HOME.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch.txt \
 && pip install -c constraints.txt -c /tmp/torch.txt "/opt/actcache[extract]" \
 && actcache --help > /dev/null

# One flow run at a time: on a GPU machine, one worker per GPU (CUDA_VISIBLE_DEVICES).
CMD ["prefect", "worker", "start", "--pool", "actcache", "--type", "process", "--limit", "1"]

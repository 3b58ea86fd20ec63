# actcache worker, CPU. Build from the repository root:
#   docker build -f infra/worker.Dockerfile -t actcache-worker:cpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/cache/huggingface \
    ACTCACHE_CACHE_DIR=/cache/actcache \
    ACTCACHE_HOME=/opt/actcache

# torch's CPU wheel first: the project's bare `torch` requirement would otherwise pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/actcache
COPY . /opt/actcache
# The constraint keeps the torch installed above; deployments' pull step runs flows from ACTCACHE_HOME.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch.txt \
 && pip install -c /tmp/torch.txt /opt/actcache \
 && actcache --help > /dev/null

CMD ["prefect", "worker", "start", "--pool", "actcache", "--type", "process", "--limit", "1"]

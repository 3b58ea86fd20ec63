# actcache worker, CUDA: the official PyTorch image (torch + CUDA + cuDNN) plus this project. Build from the
# repository root; pick the base that matches your driver (https://hub.docker.com/r/pytorch/pytorch/tags):
#   docker build -f infra/worker-cuda.Dockerfile -t actcache-worker:cuda .
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/cache/huggingface \
    ACTCACHE_CACHE_DIR=/cache/actcache \
    ACTCACHE_HOME=/opt/actcache

WORKDIR /opt/actcache
COPY . /opt/actcache
# Keep the image's CUDA torch: without the constraint pip could replace it with another build.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch.txt \
 && pip install -c /tmp/torch.txt /opt/actcache \
 && actcache --help > /dev/null

# One flow run at a time per GPU: start one worker per GPU (CUDA_VISIBLE_DEVICES) on a shared machine.
CMD ["prefect", "worker", "start", "--pool", "actcache", "--type", "process", "--limit", "1"]

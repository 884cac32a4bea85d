# secateur's GPU worker image: the wheel installed by deploy/install.sh (the same script as on a VM) with a CUDA torch.
#   python -m build --wheel && docker build -t secateur:0.1.0 .
#   docker run --gpus all -e PREFECT_API_URL=... secateur:0.1.0 worker --pool gpu --gpus 0
# torch's CUDA wheels carry their own CUDA and cuDNN libraries; the base image only brings the driver hookup.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/secateur

COPY deploy/install.sh /tmp/install/install.sh
COPY dist/secateur-*.whl /tmp/install/
RUN PYTHON=/opt/secateur/bin/python TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        bash /tmp/install/install.sh /tmp/install/secateur-*.whl \
    && rm -rf /tmp/install

# Each worker keeps its own state dir (models, checkpoints, caches); runs share only Prefect, MLflow and the store.
ENV PATH=/opt/secateur/bin:$PATH SECATEUR_HOME=/var/lib/secateur
WORKDIR /var/lib/secateur
ENTRYPOINT ["tini", "--", "secateur"]
CMD ["worker", "--pool", "gpu", "--gpus", "0"]

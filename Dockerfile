# NGC image with PyTorch, Transformer Engine, apex and Megatron-Core; the project is installed on top
# without touching them.  docker build -t minitron-nemo .   (or enroot import dockerd://minitron-nemo)
# nemo:26.04 ships Megatron-Core 0.17.0 and TE 2.14 (inside the tested range 0.16.1-0.19.x); the choice,
# the other tags and their versions: docs/containers.md. Checked by tests/test_container_pins.py.
ARG BASE=nvcr.io/nvidia/nemo:26.04
FROM ${BASE}
WORKDIR /opt/minitron_nemo
COPY pyproject.toml README.md ./
COPY minitron_nemo ./minitron_nemo
COPY recipes ./recipes
COPY conf ./conf
COPY launchers ./launchers
# torch (>=2.4), Megatron-Core, TE and apex come from the image and are kept: pip adds only what is missing
RUN pip install --no-cache-dir -e . && python -c "import torch, minitron_nemo; print(torch.__version__)"
ENV CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_NVLS_ENABLE=0

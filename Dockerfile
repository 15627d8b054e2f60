# CUDA image with mlpot and its GPU extra (Triton kernels).
# Untested in the project's CI: the development machines run no Docker engine.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/mlpot
COPY pyproject.toml README.md ./
COPY mlpot ./mlpot
COPY kernels ./kernels
COPY configs ./configs
RUN pip install --no-cache-dir ".[gpu]"

CMD ["mlpot", "--help"]

# llmctl serve in a container: CPU by default; a CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t llmctl:cuda .
# Checkpoints come from a volume mounted at /models; the API key from the LLMCTL_API_KEY environment variable.
#   docker run -p 8000:8000 -v $PWD/runs/demo/tiny/checkpoints:/models -e LLMCTL_API_KEY=... llmctl \
#     tiny=/models/step-00000240
ARG PYTHON=python:3.11-slim
FROM ${PYTHON}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH=torch
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# g++: llmctl compiles its CPU decode kernels for the machine it runs on, at the first model load
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first, from the index the build asked for, so that installing llmctl never swaps it for another build
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}" \
    && pip freeze | grep -i '^torch[=@ ]' > /tmp/torch-constraint.txt
WORKDIR /opt/llmctl
COPY pyproject.toml README.md ./
COPY llmctl ./llmctl
RUN pip install -c /tmp/torch-constraint.txt ".[serve]" \
    && useradd --create-home --uid 10001 llmctl
USER llmctl
# the CPU decode kernels are compiled on first use into torch's extension cache: keep it writable
ENV TORCH_EXTENSIONS_DIR=/home/llmctl/.cache/torch_extensions

VOLUME ["/models"]
EXPOSE 8000
ENTRYPOINT ["llmctl", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["model=/models/model"]

# Teacher image: vLLM (CUDA 12.8, Hopper and Blackwell) + vpmoe, for `vpmoe cache-teacher`.
ARG CUDA_IMAGE
FROM ${CUDA_IMAGE}
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG VLLM_WHEEL
ARG TRANSFORMERS_VERSION

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VLLM_NO_USAGE_STATS=1 \
    TORCH_CUDA_ARCH_LIST="9.0;10.0"
RUN apt-get update && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev git && \
    rm -rf /var/lib/apt/lists/* && \
    python${PYTHON_VERSION} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX} && \
    pip install "${VLLM_WHEEL}" "transformers==${TRANSFORMERS_VERSION}"

WORKDIR /opt/vpmoe
COPY pyproject.toml README.md ./
COPY cli cli
COPY common common
COPY teacher_cache teacher_cache
COPY student_train student_train
COPY demo demo
COPY configs configs
RUN pip install --no-deps -e . && pip install typer rich pyyaml zstandard "pyarrow>=17" datasets huggingface_hub safetensors

# /data: tokenized dataset (read-only); /cache: teacher shards (written); /models: teacher weights
VOLUME ["/data", "/cache", "/models"]
ENTRYPOINT ["vpmoe"]
CMD ["cache-teacher", "--help"]

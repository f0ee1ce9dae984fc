# Trainer image: torch (CUDA 12.8) + flash-attn + vpmoe, for `vpmoe train` under torchrun.
ARG CUDA_IMAGE
FROM ${CUDA_IMAGE}
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG TRANSFORMERS_VERSION
ARG FLASH_ATTN_VERSION

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 TORCH_CUDA_ARCH_LIST="9.0;10.0" MAX_JOBS=16
RUN apt-get update && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev git ninja-build && \
    rm -rf /var/lib/apt/lists/* && \
    python${PYTHON_VERSION} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX} && \
    pip install "transformers==${TRANSFORMERS_VERSION}" packaging wheel && \
    pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

WORKDIR /opt/vpmoe
COPY pyproject.toml README.md ./
COPY cli cli
COPY common common
COPY teacher_cache teacher_cache
COPY student_train student_train
COPY demo demo
COPY configs configs
RUN pip install -e .

# /cache: teacher shards (read-only); /models: student weights; /runs: checkpoints, logs, exports
VOLUME ["/cache", "/models", "/runs"]
ENTRYPOINT ["vpmoe"]
CMD ["train", "--help"]

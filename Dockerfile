# syntax=docker/dockerfile:1
# Tandem's image: a virtualenv built in one stage, copied into a clean, non-root runtime.
# Build from the repository root: docker build -t tandem .
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tandem
# Dependencies in their own layer, rebuilt only when the lock changes: exactly the versions of
# requirements/image.txt (the ones CI tested), each file checked against the lock's hashes
# (--require-hashes; a dependency the lock does not pin is refused too), wheels only (no
# source distribution's build code runs here).
WORKDIR /src
COPY requirements/image.txt ./requirements/
RUN /opt/tandem/bin/pip install --require-hashes --only-binary=:all: -r requirements/image.txt
# Tandem itself, without dependencies, built by the locked setuptools (no isolated build
# environment fetched unchecked), which then leaves the runtime.
COPY pyproject.toml README.md ./
COPY tandem ./tandem
RUN /opt/tandem/bin/pip install --no-deps --no-build-isolation . \
    && /opt/tandem/bin/pip uninstall --yes setuptools \
    && /opt/tandem/bin/python -m compileall -q /opt/tandem/lib

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_HOST=0.0.0.0 \
    TANDEM_PORT=8000 \
    TANDEM_MIGRATE_ON_START=false
WORKDIR /srv/tandem
USER 10001:10001
EXPOSE 8000
# `tandem serve` is PID 1 (exec form, no shell in between): docker stop's SIGTERM reaches it,
# the scheduler drains (its runs go to other instances) and uvicorn finishes open requests.
STOPSIGNAL SIGTERM
# The port the server was given (TANDEM_PORT), not a fixed 8000.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('TANDEM_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tandem"]
CMD ["serve"]

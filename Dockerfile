# rxfilterd container image. Run with the host's network namespace and libvirt socket;
# see docs/service.md for the `docker run` command.

# --- build stage: libvirt-python needs libvirt headers, pkg-config and a compiler ---
FROM python:3.11.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rxfilterd ./rxfilterd
# Wheels for the package and every dependency, so the runtime stage needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime stage: only the shared library libvirt-python links against ---
FROM python:3.11.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt0 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels rxfilterd \
    && rm -rf /wheels
# Runs as root in the container: it needs CAP_NET_ADMIN in the host network namespace and
# the root-owned read-write libvirt socket (same reasoning as the systemd unit).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# No HEALTHCHECK: rxfilterd serves no endpoint to probe; it exits non-zero on a fatal
# error, so `--restart on-failure` covers liveness, and its watchdog is systemd's.
HEALTHCHECK NONE
ENTRYPOINT ["rxfilterd"]
CMD ["--config", "/etc/rxfilterd/rxfilterd.toml"]

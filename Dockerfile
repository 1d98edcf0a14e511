# Sluice: one image for the API, workers and the demo echo backend.
#
#   docker build -t sluice .
#   docker run --rm -p 9000:9000 -p 8443:8443 sluice --listen 0.0.0.0:9000 --demo
#
# Stage 1 builds with the official Rust image; the dependency layer is cached separately
# from the sources (it is rebuilt only when Cargo.toml/Cargo.lock change).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/Cargo.toml
COPY api/Cargo.toml api/Cargo.toml
COPY worker/Cargo.toml worker/Cargo.toml
COPY demo/Cargo.toml demo/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
# Stub sources so `cargo build` compiles only the dependencies in this layer.
RUN for c in shared worker demo; do mkdir -p $c/src && echo "" > $c/src/lib.rs; done \
 && mkdir -p api/src tests/src/bin bench/src \
 && echo "" > api/src/lib.rs && echo "fn main() {}" > api/src/main.rs \
 && echo "" > tests/src/lib.rs && echo "fn main() {}" > tests/src/bin/sluice-e2e.rs \
 && echo "fn main() {}" > bench/src/main.rs \
 && cargo build --release -p sluice-api \
 && rm -rf shared/src api/src worker/src demo/src tests/src bench/src
COPY . .
# Make cargo see the real sources as newer than the stubs.
RUN find shared api worker demo -name '*.rs' -exec touch {} + \
 && cargo build --release -p sluice-api \
 && cp target/release/sluice-api /usr/local/bin/sluice-api

# Stage 2: a slim runtime, non-root.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice \
 && mkdir -p /var/lib/sluice/data /var/lib/sluice/state /certs \
 && chown sluice: /var/lib/sluice/data /var/lib/sluice/state /certs
COPY --from=build /usr/local/bin/sluice-api /usr/local/bin/sluice-api
COPY examples/seed.sh /usr/local/share/sluice/seed.sh
USER sluice
WORKDIR /var/lib/sluice
ENV SLUICE_DATA_DIR=/var/lib/sluice/data
EXPOSE 9000 8443 8080
ENTRYPOINT ["/usr/local/bin/sluice-api"]

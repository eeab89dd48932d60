# syntax=docker/dockerfile:1
# Build: docker build -t account-projector .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, from the manifests alone, so that editing code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crates/domain/Cargo.toml crates/domain/
COPY crates/store/Cargo.toml crates/store/build.rs crates/store/
COPY crates/ingest/Cargo.toml crates/ingest/
COPY crates/projector/Cargo.toml crates/projector/
COPY crates/api/Cargo.toml crates/api/
COPY crates/argyle/Cargo.toml crates/argyle/
COPY crates/enricher/Cargo.toml crates/enricher/
COPY crates/account-projector/Cargo.toml crates/account-projector/
COPY crates/loadgen/Cargo.toml crates/loadgen/
RUN for crate in domain store ingest projector api argyle enricher account-projector loadgen; do \
        mkdir -p crates/$crate/src && echo "" > crates/$crate/src/lib.rs; \
    done \
    && echo "fn main() {}" > crates/account-projector/src/main.rs \
    && echo "fn main() {}" > crates/loadgen/src/main.rs \
    && mkdir -p crates/loadgen/src/bin && echo "fn main() {}" > crates/loadgen/src/bin/bench.rs \
    && mkdir -p tests/soak && echo "" > tests/soak/main.rs \
    && mkdir -p migrations tests/e2e && echo "" > tests/e2e/main.rs \
    && cargo build --release --locked -p account-projector \
    && rm -rf crates/*/src target/release/.fingerprint/domain-* target/release/.fingerprint/store-* \
       target/release/.fingerprint/ingest-* target/release/.fingerprint/projector-* \
       target/release/.fingerprint/api-* target/release/.fingerprint/account-projector-* \
       target/release/.fingerprint/argyle-* target/release/.fingerprint/enricher-* \
       target/release/.fingerprint/loadgen-*
COPY crates crates
COPY migrations migrations
RUN cargo build --release --locked -p account-projector --bin account-projector

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home projector
COPY --from=build /src/target/release/account-projector /usr/local/bin/account-projector
USER projector
ENV LISTEN_ADDR=0.0.0.0:8080 LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${LISTEN_ADDR##*:}/healthz" || exit 1
ENTRYPOINT ["account-projector"]
CMD ["serve"]

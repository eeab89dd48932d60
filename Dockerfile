# syntax=docker/dockerfile:1
# Build: docker build -t account-projector .
#
# Stages:
# - chef: the Rust image with cargo-chef (pinned), shared by the next two.
# - planner: `cargo chef prepare` reduces the workspace to recipe.json, its manifests and lock file
#   alone; the recipe changes only when dependencies do.
# - build: `cargo chef cook` builds account-projector's dependencies from the recipe alone, a layer
#   that editing code does not invalidate; then the sources, and the release binary.
# - runtime: debian slim with curl for the healthcheck, the binary, a non-root user.
FROM rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p account-projector
# What the binary is built from. Cargo reads the test targets' paths (`tests/`) without opening
# them, and the cook left placeholders there anyway.
COPY Cargo.toml Cargo.lock ./
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

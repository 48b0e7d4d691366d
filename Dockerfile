# syntax=docker/dockerfile:1
# Build: docker build -t credbroker .
# Run:   docker run -p 50051:50051 -p 8080:8080 -v credbroker-data:/data credbroker
# CI builds exactly this context without a Docker engine and starts the result
# (scripts/docker-context.sh).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# Build flags: tokio's unstable API for the multi-thread runtime's setting (src/server/cores.rs).
COPY .cargo/config.toml .cargo/config.toml
COPY proto proto
COPY src src
# Not built, but the manifest names them: cargo refuses a manifest whose targets are missing.
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin credbroker \
 && mkdir -p /data && chown credbroker /data
COPY --from=build /src/target/release/credbroker /src/target/release/credbrokerctl /usr/local/bin/
USER credbroker
ENV CREDBROKER_LISTEN=0.0.0.0:50051 \
    CREDBROKER_HTTP_LISTEN=0.0.0.0:8080 \
    CREDBROKER_DATA_DIR=/data \
    CREDBROKER_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 50051 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/credbroker"]

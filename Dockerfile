# syntax=docker/dockerfile:1
# Build: docker build -t credbroker .
# Run:   docker run -p 50051:50051 -v credbroker-data:/data credbroker
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
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
    CREDBROKER_DATA_DIR=/data \
    CREDBROKER_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/credbroker"]

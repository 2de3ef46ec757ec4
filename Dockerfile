# Multi-stage build: a static-enough release binary on a small, non-root runtime.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin shard-sd

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/shard-sd /usr/local/bin/shard-sd
USER nonroot:nonroot
EXPOSE 9001
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/shard-sd", "probe", "http://127.0.0.1:9001/readyz"]
ENTRYPOINT ["/usr/local/bin/shard-sd"]

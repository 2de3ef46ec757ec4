# Multi-stage build: release binaries on a small, non-root runtime image.
#   docker build -t shard-sd .                          # the sidecar
#   docker build --target sample-app -t sample-app .    # the sample workload
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin shard-sd --bin sample-app

FROM gcr.io/distroless/cc-debian12:nonroot AS sample-app
COPY --from=build /src/target/release/sample-app /usr/local/bin/sample-app
# The distroless "nonroot" user.
USER 65532:65532
EXPOSE 3000 9779
ENTRYPOINT ["/usr/local/bin/sample-app"]

FROM gcr.io/distroless/cc-debian12:nonroot AS shard-sd
COPY --from=build /src/target/release/shard-sd /usr/local/bin/shard-sd
# The distroless "nonroot" user.
USER 65532:65532
EXPOSE 9001 9002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
  CMD ["/usr/local/bin/shard-sd", "probe", "http://127.0.0.1:9001/readyz"]
ENTRYPOINT ["/usr/local/bin/shard-sd"]

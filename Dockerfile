# bearer-proxy container image.
#
#   docker build -t bearer-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 -v $PWD/bearer-proxy.toml:/etc/bearer-proxy/bearer-proxy.toml:ro -e WLL_CLIENT_ID -e WLL_CLIENT_SECRET bearer-proxy
#
# Publish the port on the host's loopback only (-p 127.0.0.1:8080:8080, never -p 8080:8080):
# whoever reaches the port uses your credentials.
#
# Inside a container the config must differ from a host install (config/docker.toml is a
# ready example):
#   listen = "0.0.0.0:8080"            # the container's 127.0.0.1 is unreachable from Docker's port publishing
#   allow_non_loopback = true          # required for any non-loopback listen address
#   allowed_clients = ["172.17.0.0/16", "127.0.0.0/8"]
#                                      # published-port traffic arrives from the bridge gateway
#                                      # (172.17.0.1 on the default bridge), not from 127.0.0.1;
#                                      # on a user-defined/compose network use its subnet instead
#
# Other commands work the same way, e.g. `docker run --rm -v ...:ro bearer-proxy check`.

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what the release binary needs; tests/ is not built by `cargo build`.
COPY Cargo.toml Cargo.lock ./
COPY src/ src/
RUN cargo build --release --locked

FROM debian:bookworm-slim
# ca-certificates: the system trust roots for upstreams and token endpoints.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin bearer-proxy \
    && mkdir -p /etc/bearer-proxy
COPY --from=build /src/target/release/bearer-proxy /usr/local/bin/bearer-proxy
ENV BEARER_PROXY_CONFIG=/etc/bearer-proxy/bearer-proxy.toml
USER 10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/bearer-proxy"]
CMD ["run"]

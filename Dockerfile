# A container image of pmnc running examples/hello (docs/deploy.md walks through it).
#
#   docker build -t rustomnic .
#   docker run --rm -p 8080:8080 -p 9100:9100 -v hello-state:/srv/pmnc/app/.data rustomnic
#
# Your app instead: copy its folder over /srv/pmnc/app in an image built FROM this one, or mount
# it there. The state of its cages (SQLite: pmnc.state and the durable calls) lives in each
# cage's .data/, here a volume.

# --- build: cargo on Debian bookworm (the same libc as the image it runs on) ---
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# mlua (Lua 5.4), SQLite and ring build their C parts with the image's cc.
RUN cargo build --release --locked -p pmnc \
 && strip target/release/pmnc

# --- run: a slim base, a user of its own, nothing but the binary and the app ---
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 pmnc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /srv/pmnc --shell /usr/sbin/nologin pmnc \
 && mkdir -p /srv/pmnc/app/.data \
 && chown -R pmnc:pmnc /srv/pmnc
COPY --from=build /src/target/release/pmnc /usr/local/bin/pmnc
COPY deploy/container/entrypoint.sh /usr/local/bin/pmnc-entrypoint
COPY --chown=pmnc:pmnc examples/hello/ /srv/pmnc/app/
# The container's cage.toml: listens on every address, the monitor on 9100, JSON logs.
COPY --chown=pmnc:pmnc deploy/container/cage.toml /srv/pmnc/app/cage.toml
# Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /srv/pmnc
# Declared after the folder is made and owned, so a new volume starts owned by pmnc.
VOLUME ["/srv/pmnc/app/.data"]
EXPOSE 8080 9100
# SIGTERM: /readyz turns 503, the listeners close after drain_delay (3 s), requests in flight
# end; `docker stop -t` (default 10 s) must leave room for drain_delay plus request_timeout.
STOPSIGNAL SIGTERM
# /healthz: every worker thread's event loop turns (decision 144). `pmnc health` is the client:
# the image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/pmnc", "health", "--timeout", "2s", "http://127.0.0.1:9100/healthz"]
ENTRYPOINT ["/usr/local/bin/pmnc-entrypoint"]
CMD ["run", "/srv/pmnc/app"]

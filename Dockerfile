# Compliance Gateway: `gateway serve` as a non-root user.
#   config (read-only):  /etc/gateway      (gateway.toml, policies/, keys, TLS)
#   data (volume):       /var/lib/gateway  (hold store, device inventory)
# Build:  docker build -t compliance-gateway .
# Run:    docker run -p 587:2587 -p 465:2465 -v /srv/gateway:/etc/gateway:ro -v gw-data:/var/lib/gateway compliance-gateway
#   /srv/gateway is YOUR configuration directory: start from deploy/docker/gateway.toml (TLS
#   certificate, your MDM's keys, your policies). Inside the container the gateway listens
#   on 0.0.0.0 and keeps held mail in the data volume (the ENV below), so AUTH is offered
#   over TLS only: the repository's config/ (the loopback demo, plaintext AUTH, development
#   key) is refused here with one line naming the setting. Checked by
#   tests/deploy/test_container.py::test_the_documented_docker_run_line_works_as_written.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir '.[fast]'

FROM python:3.11-slim
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/gateway /etc/gateway \
    && chown 10001:10001 /var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH="/opt/gateway/bin:${PATH}" \
    GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    GATEWAY_SMTP__LISTEN=0.0.0.0:2587 \
    GATEWAY_ADMIN__LISTEN=0.0.0.0:9587 \
    GATEWAY_HOLD__DATABASE=/var/lib/gateway/hold.db \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
# 2587: submission (STARTTLS), 2465: implicit TLS (map 587/465 outside); 9587: admin HTTP;
# 9588: the sync endpoint Dovecot and nginx ask ([sync], off unless configured).
EXPOSE 2587 2465 9587 9588
# SIGTERM drains: sessions in flight finish within --grace, then 421 4.3.2.
STOPSIGNAL SIGTERM
# Liveness on the admin port (GATEWAY_ADMIN__LISTEN above).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9587/livez', timeout=3)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--grace", "30"]

"""Configurations for several daemons on several machines: HAProxy in front of them and Prometheus
scraping them. Pure text from a list of backends; ``enserve deploy`` writes them, and the files
under ``deploy/`` are its output for three example machines."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PORTS", "SCRAPE_INTERVAL_S", "Backend", "BalancerPorts", "HealthCheck", "haproxy_config",
           "parse_backend", "prometheus_config"]

DEFAULT_PORTS = (8000, 8001, 8002)  # Triton's HTTP, gRPC and metrics ports
SCRAPE_INTERVAL_S = 5  # Prometheus's seconds between scrapes
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


@dataclass(frozen=True)
class Backend:
    """One daemon: where its HTTP, gRPC and metrics endpoints listen."""

    host: str
    http_port: int = DEFAULT_PORTS[0]
    grpc_port: int = DEFAULT_PORTS[1]
    metrics_port: int = DEFAULT_PORTS[2]


@dataclass(frozen=True)
class BalancerPorts:
    """Where the balancer listens: the daemons' own ports, so clients only change the host."""

    http: int = DEFAULT_PORTS[0]
    grpc: int = DEFAULT_PORTS[1]
    stats: int = 8404  # HAProxy's stats page (/stats) and its Prometheus exporter (/metrics)


@dataclass(frozen=True)
class HealthCheck:
    """HAProxy's active checks of ``/v2/health/ready``: a daemon is taken out after ``fall``
    failed checks ``interval_ms`` apart, and back in after ``rise`` good ones."""

    interval_ms: int = 1000
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 1000

    def detection_window_s(self) -> float:
        """Longest a dead daemon stays in rotation: ``fall`` checks, each up to its timeout."""
        return self.fall * (self.interval_ms + self.timeout_ms) / 1000


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"backend '{spec}': port '{text}' is not a number in 1-65535")
    return int(text)


def parse_backend(spec: str) -> Backend:
    """``HOST`` or ``HOST:HTTP,GRPC[,METRICS]`` (Triton's 8000,8001,8002 by default).
    An IPv6 address goes in brackets: ``[::1]:8000,8001``."""
    host, sep, ports = spec.rpartition(":") if not spec.endswith("]") else (spec, "", "")
    if not sep:
        host, ports = spec, ""
    if not _HOST.match(host):
        raise ValueError(f"backend '{spec}': '{host}' is not a host name or address (HOST or HOST:HTTP,GRPC[,METRICS])")
    if not sep:
        return Backend(host)
    numbers = [_port(p, spec) for p in ports.split(",")]
    if len(numbers) not in (2, 3):
        raise ValueError(f"backend '{spec}': give HTTP,GRPC or HTTP,GRPC,METRICS ports after the host, "
                         f"not {len(numbers)} port(s)")
    return Backend(host, *numbers)


def _check_backends(backends: list[Backend]) -> None:
    if not backends:
        raise ValueError("no backends: give at least one --backend HOST[:HTTP,GRPC[,METRICS]]")
    seen = [(b.host, b.http_port) for b in backends]
    for i, key in enumerate(seen):
        if key in seen[:i]:
            raise ValueError(f"backend {key[0]}:{key[1]} is given twice")


def haproxy_config(backends: list[Backend], ports: BalancerPorts = BalancerPorts(),
                   check: HealthCheck = HealthCheck(), *, command: str = "") -> str:
    """An ``haproxy.cfg`` balancing KServe v2 gRPC per request (HTTP/2 end to end) and HTTP over
    ``backends``, with active readiness checks, retries and the stats page."""
    _check_backends(backends)
    names = [f"enserve{i}" for i in range(len(backends))]
    http_servers = "\n".join(
        f"    server {n} {b.host}:{b.http_port} check" for n, b in zip(names, backends))
    grpc_servers = "\n".join(
        f"    server {n} {b.host}:{b.grpc_port} proto h2 track enserve_http/{n}"
        for n, b in zip(names, backends))
    header = f"# Written by: {command}\n" if command else ""
    return f"""{header}# HAProxy in front of {len(backends)} enserve daemon(s). Each gRPC call is an HTTP/2 stream, and
# HAProxy balances streams, not connections: one client's calls spread over every daemon.
global
    log stdout format raw local0 notice

defaults
    mode http
    log global
    timeout connect 1s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 60s
    timeout check {check.timeout_ms}ms
    # Inference is a pure function of its inputs, so replaying a request is safe: a request that
    # found its daemon gone (refused, or closed without an answer) or answered 503 (draining, a
    # member down) is sent again, to another daemon. Requests larger than tune.bufsize (16 KiB by
    # default) cannot be replayed and fail instead.
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response 503
    # a daemon that stops answering is out of rotation within {check.detection_window_s():g} s
    default-server inter {check.interval_ms}ms fall {check.fall} rise {check.rise}

frontend kserve_http
    bind :{ports.http}
    default_backend enserve_http

frontend kserve_grpc
    bind :{ports.grpc} proto h2
    default_backend enserve_grpc

backend enserve_http
    balance roundrobin
    option httpchk
    http-check send meth GET uri /v2/health/ready
    http-check expect status 200
{http_servers}

# The gRPC servers follow the HTTP servers' readiness checks (the same daemon).
backend enserve_grpc
    balance roundrobin
{grpc_servers}

frontend stats
    bind :{ports.stats}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
"""


def prometheus_config(backends: list[Backend], balancers: list[str] = (), *, interval_s: int = SCRAPE_INTERVAL_S,
                      command: str = "") -> str:
    """A ``prometheus.yml`` scraping every daemon's metrics port and each balancer's exporter
    (``HOST:PORT``), each daemon labelled ``instance`` by its own address."""
    _check_backends(backends)
    daemons = "\n".join(f"          - '{b.host}:{b.metrics_port}'" for b in backends)
    header = f"# Written by: {command}\n" if command else ""
    text = f"""{header}# Prometheus scraping {len(backends)} enserve daemon(s){' and the balancer' if balancers else ''}.
# Ensemble throughput across daemons (images/s):
#   sum(rate(nv_inference_count{{model="ensemble"}}[1m]))
# p99 latency across daemons (seconds):
#   histogram_quantile(0.99, sum by (le) (rate(enserve_request_duration_seconds_bucket{{model="ensemble"}}[1m])))
global:
  scrape_interval: {interval_s}s
  evaluation_interval: {interval_s}s

scrape_configs:
  - job_name: enserve
    static_configs:
      - targets:
{daemons}
"""
    if balancers:
        listed = "\n".join(f"          - '{b}'" for b in balancers)
        text += f"""  - job_name: haproxy
    metrics_path: /metrics
    static_configs:
      - targets:
{listed}
"""
    return text

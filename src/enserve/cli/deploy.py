"""``enserve deploy``: write the configuration for several daemons behind HAProxy, and the
Prometheus scrape configuration for them."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from enserve.cli.common import USAGE, fail
from enserve.deploy import (
    SCRAPE_INTERVAL_S,
    Backend,
    BalancerPorts,
    HealthCheck,
    haproxy_config,
    parse_backend,
    prometheus_config,
)


def _backend(text: str) -> Backend:
    try:
        return parse_backend(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("deploy", help="write configurations for several daemons: HAProxy in front, "
                                      "Prometheus scraping them")
    kinds = p.add_subparsers(dest="kind", required=True)
    backend_help = ("a daemon: HOST, or HOST:HTTP,GRPC[,METRICS] when not on Triton's 8000,8001,8002; "
                    "repeat it for each daemon")

    h = kinds.add_parser("haproxy", help="haproxy.cfg balancing gRPC per request (HTTP/2 end to end) and HTTP")
    h.add_argument("--backend", type=_backend, action="append", required=True, help=backend_help)
    h.add_argument("--http-port", type=int, default=BalancerPorts.http, help="the balancer's HTTP port")
    h.add_argument("--grpc-port", type=int, default=BalancerPorts.grpc, help="the balancer's gRPC port")
    h.add_argument("--stats-port", type=int, default=BalancerPorts.stats,
                   help="the balancer's stats page (/stats) and Prometheus exporter (/metrics)")
    h.add_argument("--check-interval-ms", type=int, default=HealthCheck.interval_ms,
                   help="milliseconds between readiness checks of each daemon")
    h.add_argument("--fall", type=int, default=HealthCheck.fall, help="failed checks that take a daemon out")
    h.add_argument("--rise", type=int, default=HealthCheck.rise, help="good checks that put it back")
    h.add_argument("--output", type=Path, default=None, help="write here (default: standard output)")
    h.set_defaults(run=run, parser=h)

    m = kinds.add_parser("prometheus", help="prometheus.yml scraping every daemon and the balancer")
    m.add_argument("--backend", type=_backend, action="append", required=True, help=backend_help)
    m.add_argument("--balancer", action="append", default=[],
                   help="HOST:PORT of a balancer's Prometheus exporter (HAProxy: its --stats-port)")
    m.add_argument("--interval", type=int, default=SCRAPE_INTERVAL_S, help="seconds between scrapes")
    m.add_argument("--output", type=Path, default=None, help="write here (default: standard output)")
    m.set_defaults(run=run, parser=m)


def command_line(args: argparse.Namespace) -> str:
    """The command that writes this file, for its header (``--output`` left out)."""
    words = ["enserve", "deploy", args.kind]
    for b in args.backend:
        words += ["--backend", f"{b.host}:{b.http_port},{b.grpc_port},{b.metrics_port}"]
    if args.kind == "haproxy":
        defaults = {"http_port": BalancerPorts.http, "grpc_port": BalancerPorts.grpc,
                    "stats_port": BalancerPorts.stats, "check_interval_ms": HealthCheck.interval_ms,
                    "fall": HealthCheck.fall, "rise": HealthCheck.rise}
    else:
        defaults = {"interval": SCRAPE_INTERVAL_S}
        for b in args.balancer:
            words += ["--balancer", b]
    for name, default in defaults.items():
        if getattr(args, name) != default:
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    try:
        if args.kind == "haproxy":
            for flag in ("http_port", "grpc_port", "stats_port", "check_interval_ms", "fall", "rise"):
                if getattr(args, flag) < 1:
                    return fail("deploy", f"--{flag.replace('_', '-')} is {getattr(args, flag)}, "
                                          "but must be at least 1", USAGE)
            text = haproxy_config(args.backend, BalancerPorts(args.http_port, args.grpc_port, args.stats_port),
                                  HealthCheck(args.check_interval_ms, args.fall, args.rise),
                                  command=command_line(args))
        else:
            text = prometheus_config(args.backend, args.balancer, interval_s=args.interval,
                                     command=command_line(args))
    except ValueError as exc:
        return fail("deploy", exc, USAGE)
    if args.output is None:
        print(text, end="")
    else:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        except OSError as exc:
            return fail("deploy", f"cannot write {args.output}: {exc.strerror}")
    return 0

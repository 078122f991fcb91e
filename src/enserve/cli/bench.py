"""``enserve bench``: the closed-loop gRPC benchmark against the ceiling and the alternatives."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import int_list, positive_int
from enserve.server.config import DEFAULT_MODEL_REPOSITORY
from enserve.server.served.repository import DEFAULT_ENSEMBLE


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="closed-loop gRPC benchmark against the bare ONNX Runtime ceiling")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    p.add_argument("--model", default=DEFAULT_ENSEMBLE)
    p.add_argument("--url", default=None, help="host:port of a running server (default: start one)")
    p.add_argument("--concurrency", type=int_list, default=(1, 4, 16), help="comma-separated client concurrencies")
    p.add_argument("--images", type=int_list, default=(1, 8), help="comma-separated images per request")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per cell")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="measure every cell this many times (servers in turn each time); the table shows "
                        "each server's median round by images/s")
    p.add_argument("--no-naive", action="store_true", help="skip the baselines (replicated, naive-tuned, naive)")
    p.add_argument("--rate", default=None, metavar="R,...",
                   help="open loop instead: Poisson arrivals at each rate (requests/s, or e.g. '2x': times the whole "
                        "ensemble's measured capacity) for --seconds, against the fixed ensemble, its front's "
                        "cheapest point alone and the ensemble under --objective-ms (the model needs a front)")
    p.add_argument("--schedule", default=None, metavar="R:S,...",
                   help="open loop along a schedule of rates: each 'rate:seconds' step in turn (rates as --rate)")
    p.add_argument("--objective-ms", type=float, default=50.0, help="the open loop's latency objective")
    p.add_argument("--labelled", type=Path, default=None,
                   help="npz of rows and labels (x_test, y_test or x, y): the open loop's request stream, each "
                        "answer scored against its labels")
    p.add_argument("--plot", type=Path, default=None, help="the open loop's PNG: accuracy and p99 against load")
    p.add_argument("serve_args", nargs="*", help="extra 'enserve serve' flags after '--' (e.g. -- --batch-size 16)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from enserve.loadtest.bench import run_bench

    if args.rate is not None or args.schedule is not None:
        from enserve.loadtest.sweep import run_sweep

        return run_sweep(args)

    return run_bench(args)

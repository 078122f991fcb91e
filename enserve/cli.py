"""The ``enserve`` command. Each subcommand imports only what it needs: ``serve`` never imports torch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _env(name: str, default):
    """ENSERVE_<NAME> environment variables are the documented fallback for flags."""
    return os.environ.get("ENSERVE_" + name.upper(), default)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC/HTTP",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path(_env("model_repository", "model_repository")),
                   help="Triton-layout repository: <repo>/<model>/config.pbtxt + <repo>/<model>/1/model.onnx")
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address the three endpoints listen on")
    p.add_argument("--http-port", type=int, default=int(_env("http_port", 8000)), help="KServe v2 HTTP/REST port")
    p.add_argument("--grpc-port", type=int, default=int(_env("grpc_port", 8001)), help="KServe v2 gRPC port")
    p.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", 8002)),
                   help="Prometheus metrics port (GET /metrics)")
    p.add_argument("--grpc-transport", choices=("auto", "native", "grpcio"), default=_env("grpc_transport", "auto"),
                   help="gRPC server: 'native' (pygrpc-native's front serves ModelInfer, HTTP/2 in Rust outside "
                        "the GIL; the other RPCs go to a grpcio server behind it), 'grpcio' (needed for TLS), "
                        "or 'auto': native unless --tls-cert is given")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of every member (default: each member's config.pbtxt preferred_batch_size)")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="longest a member waits to fill a batch after its first request (default: config.pbtxt)")
    p.add_argument("--max-adaptive-wait-us", type=int, default=4000,
                   help="under concurrent load a member faster than the ensemble's slowest may hold requests "
                        "up to this long to fill its batch, without delaying answers (0: off)")
    p.add_argument("--device", default=None,
                   help="place every member on this device: 'cpu' or 'gpu:<index>' (default: config.pbtxt)")
    p.add_argument("--cpu-cores", default=None,
                   help="cores of the CPU device, e.g. '0-1' or '0,2' (default: every core this process may use)")
    p.add_argument("--threads-per-member", type=int, default=None,
                   help="ONNX Runtime intra-op threads per member (default: cores / members sharing them)")
    p.add_argument("--shm-arena-mib", type=int, default=64, help="shared input ring size per input signature")
    p.add_argument("--max-inflight", type=int, default=1024,
                   help="requests in flight per model before new ones get RESOURCE_EXHAUSTED / HTTP 503")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="server-side bound in seconds on every request (a client deadline may be shorter)")
    p.add_argument("--allow-client-shm", action="store_true",
                   help="accept system shared-memory registrations and tensors in them (Triton's extension)")
    p.add_argument("--max-request-bytes", type=int, default=256 << 20,
                   help="largest gRPC message / HTTP body accepted (RESOURCE_EXHAUSTED / HTTP 413 beyond)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: gRPC, HTTP and metrics speak TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--auth-token-file", type=Path, default=None,
                   help="file holding a bearer token every call but health probes must carry "
                        "(or the environment variable ENSERVE_AUTH_TOKEN)")
    p.add_argument("--admin-token-file", type=Path, default=None,
                   help="file holding the bearer token for admin calls: shared-memory (un)registration "
                        "and model load/unload (or ENSERVE_ADMIN_TOKEN; without it admin calls take the "
                        "auth token)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM/SIGINT waits for requests in flight before stopping")
    p.add_argument("--model-control-mode", choices=("none", "explicit", "poll"),
                   default=_env("model_control_mode", "none"),
                   help="Triton's: 'none' serves the whole repository and refuses load/unload; 'explicit' "
                        "serves the --load-model names and obeys load/unload calls (admin); 'poll' follows "
                        "the repository, re-read every --repository-poll-secs")
    p.add_argument("--load-model", action="append", default=[],
                   help="explicit mode: an ensemble (with its members) or member to serve from the start; "
                        "repeat it, or '*' for everything")
    p.add_argument("--repository-poll-secs", type=float, default=15.0,
                   help="poll mode: seconds between re-reads of the repository")
    p.add_argument("--plan", type=Path, default=None, help="serve with this allocation plan (from 'enserve allocate')")
    p.add_argument("--no-optimize", action="store_true",
                   help="skip the allocator: placement from config.pbtxt (also implied by --device, "
                        "--cpu-cores, --batch-size)")
    _add_allocator_flags(p)


def _add_allocator_flags(p) -> None:
    p.add_argument("--cpu-devices", default=None,
                   help="CPU devices as core sets, e.g. '0;1' (two devices of one core) or '0-1' "
                        "(default: all cores but core 0 on machines with 4 or more, else all)")
    p.add_argument("--max-combi", type=int, default=12, help="most allocations the search scores")
    p.add_argument("--optimize-time", type=float, default=120.0, help="time budget of the search in seconds")
    p.add_argument("--optimize-metric", choices=("throughput", "latency"), default="throughput",
                   help="what the search maximises: images/s, or minus the p99 latency under the bench load")
    p.add_argument("--bench-concurrency", type=int, default=16,
                   help="the real bench's load: requests kept in flight")
    p.add_argument("--bench-images", type=int, default=8, help="the real bench's load: images per request")


def _add_allocate(sub) -> None:
    p = sub.add_parser("allocate", help="place the members on devices and choose batch sizes; print and save the plan")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--ensemble", default=None, help="the ensemble to place (default: the only one)")
    _add_allocator_flags(p)
    p.add_argument("--batch-sizes", default="1,8,32,64", help="batch sizes the search may choose from")
    p.add_argument("--bench", choices=("real", "cost"), default="real",
                   help="score allocations on the real pipeline, or with the cost model from profiles")
    p.add_argument("--profiles", type=Path, default=None,
                   help="member profiles (JSON) instead of measuring them, e.g. for machines we do not have")
    p.add_argument("--simulate-gpus", type=int, default=0,
                   help="plan for this many GPUs (cost-model bench; the profiles must have 'gpu' latencies)")
    p.add_argument("--gpu-memory-gib", type=float, default=16.0, help="memory of each simulated GPU")
    p.add_argument("--output", type=Path, default=None, help="where to save the plan (default: in the repository)")


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="build a model repository (and an ensemble) from ONNX files")
    p.add_argument("files", nargs="+", type=Path, help="ONNX classifiers with the same inputs and outputs")
    p.add_argument("--model-repository", type=Path, required=True, help="repository to create or add to")
    p.add_argument("--ensemble", default="ensemble", help="name of the ensemble model over all the files")
    p.add_argument("--max-batch-size", type=int, default=64, help="largest batch a request may carry")
    p.add_argument("--batch-size", type=int, default=32, help="batch size each member runs at")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="batch window after the first request (0: batch only what is already queued)")


def _add_demo(sub) -> None:
    p = sub.add_parser("init-demo", help="write a repository of 4 small CNNs (3x32x32, 10 classes) and their ensemble")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="rewrite it even if it exists")
    p.add_argument("--widths", default="12,20,32,56",
                   help="first-layer widths of the members, one member each (compute grows as width^2)")


def _duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"duration '{text}' is invalid: expected e.g. 90s, 10m, 1h") from None


def _add_selection_flags(p) -> None:
    p.add_argument("--budget", type=float, default=None,
                   help="largest total inference cost of the ensemble, in seconds per 2000 samples on one core "
                        "(default: 3 x the best single model's)")
    p.add_argument("--method", choices=("smobf", "greedy"), default="smobf",
                   help="SMOBF greedy (w in 0.1, 0.01, 0.001) or forward greedy with --n-models")
    p.add_argument("--n-models", type=int, default=5, help="models of the forward-greedy baseline")
    p.add_argument("--prune", type=float, default=0.2, help="select among the top fraction of the library")
    p.add_argument("--ensemble", default="ensemble", help="name of the ensemble model in the repository")


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="search hyperparameters, select an ensemble, export it to a model repository")
    p.add_argument("--dataset", default="digits", help="digits, or a .npz, .csv, CIFAR archive or image folder")
    p.add_argument("--time-budget", type=_duration, default=_duration("10m"), help="search time, e.g. 10m")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--library", type=Path, default=Path("library"), help="where every trained trial is kept")
    p.add_argument("--storage", default=None,
                   help="Optuna storage shared by the workers: an RDB URL (postgresql://...) for several "
                        "machines; default: a journal file in the library")
    p.add_argument("--workers", type=int, default=2, help="worker processes on this machine")
    p.add_argument("--sampler", choices=("random", "tpe", "gp", "nsga2"), default="random")
    p.add_argument("--pruner", choices=("asha", "hyperband", "none"), default="asha",
                   help="asynchronous successive halving over epochs, Hyperband, or none")
    p.add_argument("--max-epochs", type=int, default=9,
                   help="epochs of a trial that is never stopped (ASHA rungs at 1, 3, 9, ... epochs)")
    p.add_argument("--seed", type=int, default=0)
    _add_selection_flags(p)


def _add_select(sub) -> None:
    p = sub.add_parser("select", help="select another ensemble from a library (no training) and export it")
    p.add_argument("--library", type=Path, required=True)
    p.add_argument("--model-repository", type=Path, required=True)
    _add_selection_flags(p)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="closed-loop gRPC benchmark against the bare ONNX Runtime ceiling")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="ensemble")
    p.add_argument("--url", default=None, help="host:port of a running server (default: start one)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    p.add_argument("--images", default="1,8", help="comma-separated images per request")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per cell")
    p.add_argument("--no-naive", action="store_true", help="skip the baselines (replicated, naive-tuned, naive)")
    p.add_argument("serve_args", nargs="*", help="extra 'enserve serve' flags after '--' (e.g. -- --batch-size 16)")


def _token(path: Path | None, env: str) -> str | None:
    """A token from a file (not the command line, which every user can read) or the environment."""
    token = path.read_text().strip() if path is not None else os.environ.get(env)
    if token is not None and (len(token) < 8 or any(c.isspace() for c in token)):
        raise ValueError(f"the token from {path or env} must be at least 8 characters without spaces")
    return token or None


def _cores(text: str | None):
    if text is None:
        return None
    from enserve.server.repository import parse_cores

    return parse_cores(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_import(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_allocate(sub)
    _add_build(sub)
    _add_select(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from enserve.server.config import ServeOptions, transport_for
        from enserve.server.daemon import run
        from enserve.server.errors import EnserveError

        try:
            transport_for(args.grpc_transport, args.tls_cert is not None)
            cores = _cores(args.cpu_cores)
            auth = _token(args.auth_token_file, "ENSERVE_AUTH_TOKEN")
            admin = _token(args.admin_token_file, "ENSERVE_ADMIN_TOKEN")
        except EnserveError as exc:
            parser.error(exc.message)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        return run(ServeOptions(
            model_repository=args.model_repository, host=args.host, http_port=args.http_port,
            grpc_port=args.grpc_port, metrics_port=args.metrics_port, grpc_transport=args.grpc_transport,
            batch_size=args.batch_size,
            queue_delay_us=args.max_queue_delay_us, max_adaptive_wait_us=args.max_adaptive_wait_us,
            device=args.device, cpu_cores=cores,
            threads_per_member=args.threads_per_member, arena_mib=args.shm_arena_mib,
            max_inflight=args.max_inflight, request_timeout_s=args.request_timeout,
            allow_client_shm=args.allow_client_shm, drain_timeout_s=args.drain_timeout,
            optimize=not args.no_optimize, plan_path=args.plan, cpu_devices=args.cpu_devices,
            max_combi=args.max_combi, optimize_time_s=args.optimize_time, optimize_metric=args.optimize_metric,
            bench_concurrency=args.bench_concurrency, bench_images=args.bench_images,
            max_request_bytes=args.max_request_bytes, tls_cert=args.tls_cert, tls_key=args.tls_key,
            auth_token=auth, admin_token=admin, model_control_mode=args.model_control_mode,
            load_model=tuple(args.load_model), repository_poll_secs=args.repository_poll_secs,
        ))
    if args.command == "import":
        from enserve.server.errors import EnserveError
        from enserve.server.repository import import_onnx

        try:
            repo = import_onnx(args.files, args.model_repository, ensemble=args.ensemble,
                               max_batch_size=args.max_batch_size, batch_size=args.batch_size,
                               queue_delay_us=args.max_queue_delay_us)
        except EnserveError as exc:
            print(f"enserve import: {exc.message}", file=sys.stderr)
            return 2
        print(f"wrote {args.model_repository}: members {sorted(repo.members)}, ensemble '{args.ensemble}'")
        return 0
    if args.command == "allocate":
        return allocate_command(args)
    if args.command in ("build", "select"):
        return build_command(args)
    if args.command == "init-demo":
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            parser.error(f"--widths '{args.widths}' is not a comma-separated list of integers")
        return init_demo(args.model_repository, force=args.force, widths=widths)
    if args.command == "bench":
        from enserve.loadtest.bench import run_bench

        return run_bench(args)
    return 2


def init_demo(repository: Path, *, force: bool = False, widths: tuple[int, ...] = (12, 20, 32, 56)) -> int:
    import tempfile

    from enserve.models.synthetic import write_tiny_cnns
    from enserve.server.repository import import_onnx

    if (repository / "ensemble" / "config.pbtxt").is_file() and not force:
        print(f"{repository} already holds an ensemble; keeping it (--force rewrites it)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tiny_cnns(Path(tmp), widths)
        import_onnx(files, repository, ensemble="ensemble")
    print(f"wrote {repository}: {len(widths)} CNN members (widths {', '.join(map(str, widths))}) "
          "and their ensemble 'ensemble'")
    return 0


def allocate_command(args) -> int:
    import json
    import logging

    from enserve.optimizer import plan as plans
    from enserve.optimizer.allocation import Device, PlacementError
    from enserve.optimizer.devices import inventory
    from enserve.optimizer.profiles import profiles_from_json
    from enserve.server.allocate import allocate, plan_table
    from enserve.server.errors import EnserveError
    from enserve.server.repository import load_repository

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        repo = load_repository(args.model_repository)
        devices = inventory(args.cpu_devices, use_gpus=not args.simulate_gpus)
        bench = args.bench
        if args.simulate_gpus:
            gib = int(args.gpu_memory_gib * 2**30)
            devices = [Device(f"gpu:{i}", "gpu", gib, index=i) for i in range(args.simulate_gpus)] + devices
            bench = "cost"
        profiles = profiles_from_json(json.loads(args.profiles.read_text())) if args.profiles else None
        done = allocate(repo, devices, ensemble=args.ensemble, metric=args.optimize_metric,
                        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                        max_combi=args.max_combi, time_budget_s=args.optimize_time, bench=bench,
                        profiles=profiles, bench_load=(args.bench_concurrency, args.bench_images), progress=print)
    except (EnserveError, PlacementError, ValueError) as exc:
        print(f"enserve allocate: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print(plan_table(done.plan))
    path = args.output or plans.plan_path(repo.path, done.plan.ensemble, done.plan.key)
    plans.save(done.plan, path)
    print(f"plan saved to {path}")
    return 0


def _export_members(library: Path, numbers: list[int], repository: Path, ensemble: str) -> None:
    """Optimise the chosen trials' ONNX files offline, write them as a model repository, and add
    TensorRT engines (``<member>/1/model.plan``) where TensorRT and a GPU are present."""
    import tempfile

    from enserve.optimizer.devices import gpus
    from enserve.server.repository import import_onnx
    from enserve.tuning.export import build_tensorrt_engine, optimise_offline, tensorrt_available
    from enserve.tuning.library import trial_dir

    names = [trial_dir(library, n).name for n in numbers]
    for_gpu = bool(gpus())
    with tempfile.TemporaryDirectory() as tmp:
        files = [optimise_offline(trial_dir(library, n) / "model.onnx", Path(tmp) / f"{name}.onnx", for_gpu=for_gpu)
                 for n, name in zip(numbers, names)]
        repo = import_onnx(files, repository, ensemble=ensemble, names=names)
    print(f"members optimised offline by ONNX Runtime ({'basic level: a GPU is present' if for_gpu else 'extended level'})")
    ok, why = tensorrt_available()
    if not ok:
        print(why)
        return
    for name in names:
        version = Path(repository) / name / "1"
        build_tensorrt_engine(version / "model.onnx", version / "model.plan", repo.members[name].inputs[0].dims)
    print(f"TensorRT engines written as <member>/1/model.plan for {len(names)} members")


def build_command(args) -> int:
    """`enserve build` (search, then select) and `enserve select` (select only)."""
    from enserve.server.errors import EnserveError
    from enserve.tuning import build
    from enserve.tuning.library import candidates, write_index

    library = args.library
    if args.command == "build":
        from enserve.tuning.search import build_library, running_trials

        print(f"building a library in {library} for {args.time_budget:g} s with {args.workers} workers "
              f"({args.sampler} sampler, {args.pruner} pruner); interrupt and rerun to continue", flush=True)
        storage = args.storage or str(library / "study.journal")

        def progress() -> None:
            print(build.progress_line(library, running=running_trials(storage), budget=args.budget), flush=True)

        try:
            build_library(args.dataset, library, storage=storage, sampler=args.sampler, pruner=args.pruner,
                          workers=args.workers, time_budget_s=args.time_budget, max_epochs=args.max_epochs,
                          seed=args.seed, progress=progress)
        except ValueError as exc:  # a dataset that cannot be read, or a bad setting: the message names it
            print(f"enserve build: {exc}", file=sys.stderr)
            return 2
        write_index(library, args.dataset)
    try:
        c = candidates(library)
    except (ValueError, OSError) as exc:
        print(f"enserve {args.command}: {exc}", file=sys.stderr)
        return 2
    single = build.best_single(c)
    budget = args.budget if args.budget is not None else 3 * single["cost"]
    rows = build.pareto_rows(c, build.default_budgets(c) + [budget], prune=args.prune)
    print(f"\nlibrary: {len(c.numbers)} models; best single model: trial {single['number']}, "
          f"test error {single['test_error']:.4f}, cost {single['cost']:.4f} s")
    print(f"{'budget s':>9} {'members':>7} {'cost s':>8} {'val loss':>8} {'val err':>7} {'test err':>8}")
    for r in sorted(rows, key=lambda r: r["budget"]):
        print(f"{r['budget']:>9.4f} {r['members']:>7} {r['cost']:>8.4f} {r['val_loss']:>8.4f} "
              f"{r['val_error']:>7.4f} {r['test_error']:>8.4f}")
    baseline = build.pareto_rows(c, build.default_budgets(c) + [budget], prune=args.prune, method="greedy",
                                 n_models=args.n_models)
    png = build.plot(c, {"SMOBF": rows, f"forward greedy ({args.n_models} models)": baseline},
                     Path(library) / "pareto.png", f"{len(c.numbers)} models: SMOBF vs forward greedy")
    print(f"plot: {png}")
    try:
        chosen = build.choose(c, budget, method=args.method, prune=args.prune, n_models=args.n_models)
        _export_members(library, chosen.numbers, args.model_repository, args.ensemble)
    except (ValueError, RuntimeError, EnserveError) as exc:
        print(f"enserve {args.command}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print(f"ensemble '{args.ensemble}' of {len(chosen.numbers)} models (cost {chosen.cost:.4f} s <= budget "
          f"{budget:.4f} s, test error {chosen.test_error:.4f}) written to {args.model_repository}")
    return 0

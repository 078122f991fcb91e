"""Open-loop load: Poisson arrivals at a rate (or a schedule of rates over time), and for each answer
its latency, its correctness against labels and the members it combined; a sweep of rates against
three ways of serving one ensemble that has a front (``enserve bench --rate``):

- ``fixed``: the whole ensemble on every request (no objective);
- ``cheapest``: the front's first point served alone (its own daemon, every core);
- ``adaptive``: the ensemble with a latency objective (the richest point that fits, answered near
  the objective with the members done).

Open loop: a request is sent at its arrival time whether or not earlier ones were answered, so an
overloaded server shows its queue in the latencies instead of slowing the client down.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enserve.loadtest.launcher import Server, start_daemon
from enserve.server.serving.service import MEMBERS_PARAMETER, REQUEST_OBJECTIVE

CAPACITY_CONCURRENCY = 16  # closed-loop clients that find the full ensemble's capacity


def arrival_times(schedule: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Poisson arrival times (seconds from the start) over ``schedule``: (rate per second, seconds)
    steps one after the other."""
    rng = np.random.default_rng(seed)
    times, start = [], 0.0
    for rate, seconds in schedule:
        if rate < 0 or seconds < 0:
            raise ValueError(f"a step of ({rate}, {seconds}) must have a rate and a duration >= 0")
        t = start
        while rate > 0:
            t += rng.exponential(1.0 / rate)
            if t >= start + seconds:
                break
            times.append(t)
        start += seconds
    return np.asarray(times)


@dataclass
class Answer:
    sent_s: float  # from the start of the run
    latency_ms: float
    correct: int | None  # rows answered right (None without labels)
    rows: int
    members: int | None  # members combined (from the answer's parameter), None when not named
    error: str | None = None


@dataclass
class Row:
    server: str
    offered_rps: float
    seconds: float
    answers: list[Answer] = field(default_factory=list)

    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.error is None]

    def goodput(self, objective_ms: float) -> float:
        """Answers within the objective, per second."""
        return sum(a.latency_ms <= objective_ms for a in self.ok()) / self.seconds

    def within(self, objective_ms: float, of_answers: bool = False) -> float:
        """The share of requests (or of answers) answered within the objective; a failed request is a
        miss of the first."""
        n = len(self.ok()) if of_answers else len(self.answers)
        return sum(a.latency_ms <= objective_ms for a in self.ok()) / n if n else math.nan

    def pct(self, q: float) -> float:
        lat = [a.latency_ms for a in self.ok()]
        return float(np.percentile(lat, q)) if lat else math.nan

    def accuracy(self) -> float:
        rows = [a for a in self.ok() if a.correct is not None]
        return sum(a.correct for a in rows) / sum(a.rows for a in rows) if rows else math.nan

    def mix(self) -> str:
        counts = Counter(a.members for a in self.ok() if a.members is not None)
        total = sum(counts.values())
        return " ".join(f"{k}:{v / total:.0%}" for k, v in sorted(counts.items())) if total else "-"


def load_labelled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels from an npz: ``x_test``/``y_test``, or ``x``/``y``."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--labelled {path}: cannot read it as an npz ({exc})") from None
    for x, y in (("x_test", "y_test"), ("x", "y")):
        if x in data and y in data:
            return data[x], data[y]
    raise SystemExit(f"{path} holds {sorted(data.files)}; it needs x_test and y_test, or x and y")


async def open_loop(url: str, model: str, input_name: str, output_name: str, datatype: str, x: np.ndarray,
                    y: np.ndarray | None, times: np.ndarray, images: int, objective_ms: float | None,
                    timeout_s: float = 10.0) -> list[Answer]:
    """Send ``images`` rows of ``x`` (cycling) at each of ``times``; each answer as it comes back."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    batches = [(k * images) % len(x) for k in range(len(times))]
    answers: list[Answer] = []

    async def one(infer, t_sent: float, lo: int, start: float) -> None:
        """One request; its latency runs from its scheduled arrival ``start`` (perf_counter), so that a
        client that falls behind does not hide the wait (coordinated omission)."""
        rows = np.take(x, range(lo, lo + images), axis=0, mode="wrap")
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype=datatype, shape=list(rows.shape))
        request.outputs.add(name=output_name)
        request.raw_input_contents.append(np.ascontiguousarray(rows).tobytes())
        if objective_ms is not None:
            request.parameters[REQUEST_OBJECTIVE].double_param = objective_ms
        try:
            reply = pb.ModelInferResponse.FromString(await infer(request.SerializeToString(), timeout=timeout_s))
        except grpc.RpcError as exc:
            answers.append(Answer(t_sent, (time.perf_counter() - start) * 1e3, None, images, None,
                                  f"{exc.code().name}: {exc.details()}"))
            return
        latency = (time.perf_counter() - start) * 1e3
        probs = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(images, -1)
        correct = None if y is None else int(np.sum(probs.argmax(1) == np.take(y, range(lo, lo + images),
                                                                                mode="wrap")))
        used = reply.parameters[MEMBERS_PARAMETER].string_param if MEMBERS_PARAMETER in reply.parameters else ""
        answers.append(Answer(t_sent, latency, correct, images, len(used.split(",")) if used else None))

    async with grpc.aio.insecure_channel(url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        t0 = time.perf_counter()
        tasks = []
        for t, lo in zip(times, batches):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(infer, float(t), lo, t0 + float(t))))
        await asyncio.gather(*tasks)
    return answers


async def capacity(url: str, model: str, input_name: str, datatype: str, x: np.ndarray, images: int,
                   seconds: float = 4.0) -> float:
    """Requests per second ``CAPACITY_CONCURRENCY`` closed-loop clients get from the whole ensemble."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    rows = np.take(x, range(images), axis=0, mode="wrap")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows).tobytes())
    payload = request.SerializeToString()
    done = 0
    async with grpc.aio.insecure_channel(url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        end = time.perf_counter() + 1.0  # warm-up
        while time.perf_counter() < end:
            await infer(payload)
        t_start = time.perf_counter()
        end = t_start + seconds

        async def user() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await infer(payload)
                done += 1

        await asyncio.gather(*(user() for _ in range(CAPACITY_CONCURRENCY)))
        return done / (time.perf_counter() - t_start)


def alone_repository(repository: Path, model: str, out: Path) -> tuple[Path, str]:
    """A repository of the first point of ``model``'s front only, and the model to ask: the member
    itself, or an ensemble of them named 'cheapest' combined as ``model`` combines them."""
    from enserve import combiners
    from enserve.server.served.importer import import_onnx
    from enserve.server.served.repository import load_repository

    ensemble = load_repository(repository).ensembles[model]
    members = ensemble.points()[0].members
    if len(members) == 1:
        shutil.copytree(Path(repository) / members[0], out / members[0], ignore=shutil.ignore_patterns(".enserve"))
        return out, members[0]
    weight = ensemble.weight_of()
    rule = combiners.get(ensemble.combiner)
    import_onnx([Path(repository) / m / "1" / "model.onnx" for m in members], out, ensemble="cheapest",
                names=list(members), combiner=ensemble.combiner if not rule.weighted else combiners.DEFAULT,
                weights=[weight[m] for m in members] if rule.weighted else None)
    return out, "cheapest"


def parse_rates(text: str, capacity_rps: float | None) -> list[float]:
    """'0.5x,1x,200' as requests per second: 'x' multiplies the measured capacity."""
    out = []
    for item in text.split(","):
        item = item.strip()
        relative = item.endswith("x")
        if relative and capacity_rps is None:
            raise SystemExit(f"rate '{item}' is relative to the capacity, which was not measured")
        try:
            rate = float(item[:-1] if relative else item)
        except ValueError:
            rate = math.nan
        if not math.isfinite(rate) or rate < 0:
            raise SystemExit(f"rate '{item}' is not a number of requests per second >= 0, nor one followed by 'x' "
                             "(times the measured capacity)")
        out.append(rate * capacity_rps if relative else rate)
    return out


def parse_schedule(text: str, capacity_rps: float) -> list[tuple[float, float]]:
    """'1x:10,4x:5' as (requests per second, seconds) steps."""
    steps = []
    for item in text.split(","):
        rate, _, seconds = item.partition(":")
        try:
            duration = float(seconds)
        except ValueError:
            duration = math.nan
        if not math.isfinite(duration) or duration <= 0:
            raise SystemExit(f"schedule step '{item}' must be 'rate:seconds' with seconds > 0, e.g. '2x:10'")
        steps.append((parse_rates(rate, capacity_rps)[0], duration))
    return steps


def print_rows(rows: list[Row], objective_ms: float, capacity_rps: float) -> None:
    print(f"\nobjective {objective_ms:g} ms; the whole ensemble's capacity {capacity_rps:.0f} requests/s "
          f"(closed loop, {CAPACITY_CONCURRENCY} clients); latency from each request's scheduled arrival; "
          "'in obj': of all requests (a failure is a miss), 'of ans': of the answers; p50, p99 and accuracy: "
          "of the answers")
    head = (f"{'server':<9} {'x cap':>5} {'offered/s':>9} {'answered/s':>10} {'goodput/s':>9} {'in obj':>7} "
            f"{'of ans':>7} {'p50 ms':>7} {'p99 ms':>8} {'accuracy':>8} {'errors':>6}  members: share")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.server:<9} {r.offered_rps / capacity_rps:>5.2f} {len(r.answers) / r.seconds:>9.1f} "
              f"{len(r.ok()) / r.seconds:>10.1f} {r.goodput(objective_ms):>9.1f} {r.within(objective_ms):>7.1%} "
              f"{r.within(objective_ms, True):>7.1%} {r.pct(50):>7.1f} {r.pct(99):>8.1f} {r.accuracy():>8.4f} "
              f"{len(r.answers) - len(r.ok()):>6}  "
              f"{r.mix()}")
    for r in rows:
        failed = Counter(a.error.split(" (")[0][:120] for a in r.answers if a.error is not None)
        for message, n in failed.most_common(2):
            print(f"  {r.server} at {r.offered_rps / capacity_rps:.2f}x: {n} x {message}")


def plot(rows: list[Row], capacity_rps: float, objective_ms: float, path: Path) -> Path | None:
    """Accuracy and p99 against offered load, one line per server (PNG)."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, p99) = plt.subplots(1, 2, figsize=(10, 4))
    for server in dict.fromkeys(r.server for r in rows):
        mine = [r for r in rows if r.server == server]
        load = [r.offered_rps / capacity_rps for r in mine]
        acc.plot(load, [r.accuracy() for r in mine], marker="o", label=server)
        p99.plot(load, [r.pct(99) for r in mine], marker="o", label=server)
    p99.axhline(objective_ms, color="grey", linestyle="--", label="objective")
    p99.set_yscale("log")
    for ax, what in ((acc, "accuracy"), (p99, "p99 latency (ms)")):
        ax.set_xlabel("offered load (x the whole ensemble's capacity)")
        ax.set_ylabel(what)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(args) -> int:
    """The three servers at each rate of ``args.rate`` (or along ``args.schedule``), side by side."""
    from enserve.loadtest.signature import signature
    from enserve.server.served.repository import load_repository

    repo = load_repository(args.model_repository)
    ensemble = repo.ensembles.get(args.model)
    if ensemble is None or len(ensemble.points()) < 2:
        raise SystemExit(f"model '{args.model}' in {args.model_repository} is not an ensemble with a front "
                         "(enserve.front: written by enserve select, or enserve import --front-order)")
    if args.schedule:  # refused before any daemon starts (the capacity only scales them)
        parse_schedule(args.schedule, 1.0)
    else:
        parse_rates(args.rate, 1.0)
    if args.labelled is not None:
        x, y = load_labelled(args.labelled)
    else:
        x, y = None, None
    objective = args.objective_ms
    images = args.images[0]
    with tempfile.TemporaryDirectory(prefix="enserve-sweep-") as tmp:
        daemon = start_daemon(args.model_repository, *args.serve_args, log=Path(tmp) / "daemon.log",
                              timeout=900)  # the allocator profiles every member first
        alone_repo, alone_model = alone_repository(args.model_repository, args.model, Path(tmp) / "alone")
        cheapest: Server | None = None
        try:
            sig = signature(daemon.grpc_url, args.model)
            if x is None:
                x = sig.batch(np.random.default_rng(0), 256)
            x = x.astype(np.dtype(sig.batch(np.random.default_rng(0), 1).dtype))
            cap = asyncio.run(capacity(daemon.grpc_url, args.model, sig.input, sig.datatype, x, images))
            cheapest = start_daemon(alone_repo, *args.serve_args, log=Path(tmp) / "cheapest.log", timeout=900)
            # 0: no objective, whatever the config or the serve flags say
            servers = [("fixed", daemon.grpc_url, args.model, 0.0), ("cheapest", cheapest.grpc_url, alone_model, 0.0),
                       ("adaptive", daemon.grpc_url, args.model, objective)]
            if args.schedule:
                steps = parse_schedule(args.schedule, cap)
            else:
                steps = [(rate, args.seconds) for rate in parse_rates(args.rate, cap)]
            rows: list[Row] = []
            for k, (rate, seconds) in enumerate(steps):
                for label, url, model, obj in servers:
                    times = arrival_times([(rate, seconds)], seed=k)
                    answers = asyncio.run(open_loop(url, model, sig.input, sig.output, sig.datatype, x, y, times,
                                                    images, obj))
                    rows.append(Row(label, rate, seconds, answers))
                    time.sleep(0.5)  # the queue drains before the next server
        finally:
            daemon.stop()
            if cheapest is not None:
                cheapest.stop()
    print_rows(rows, objective, cap)
    if args.plot is not None:
        png = plot(rows, cap, objective, args.plot)
        if png is not None:
            print(f"plot: {png}")
    return 0

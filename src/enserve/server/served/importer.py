"""A model repository from ONNX files: each file a member in Triton's layout, and an ensemble over
them (``enserve import``, the build's export, the demo)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from enserve import combiners
from enserve.options import check_fields, option
from enserve.server.config import DEFAULT_MODEL_REPOSITORY
from enserve.server.errors import RepositoryError
from enserve.server.served.front import FrontPoint, front_text, parse_front
from enserve.server.served.repository import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_ENSEMBLE,
    DEFAULT_MAX_BATCH_SIZE,
    NAME_CHARS,
    EnsembleSpec,
    MemberSpec,
    Repository,
    check_compatible,
    check_model_name,
    ensemble_config,
    ensemble_outputs,
    load_repository,
    member_config,
    parse_weights,
    read_onnx_signature,
    write_config,
)


@dataclass(kw_only=True)
class ImportOptions:
    """What ``enserve import`` takes besides its ONNX files (its flags are generated from these)."""

    model_repository: Path = option(DEFAULT_MODEL_REPOSITORY, "--model-repository",
                                    "repository to create or add to", Path)
    ensemble: str = option(DEFAULT_ENSEMBLE, "--ensemble", "name of the ensemble model over all the files", str)
    combiner: str = option(combiners.DEFAULT, "--combiner", "how the ensemble combines its members: " + "; ".join(
        f"{n}: {combiners.get(n).doc}" for n in combiners.unweighted()), str, choices=tuple(combiners.unweighted()))
    max_batch_size: int = option(DEFAULT_MAX_BATCH_SIZE, "--max-batch-size", "largest batch a request may carry",
                                 int, minimum=1)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "--batch-size", "batch size each member runs at (at most "
                             "--max-batch-size)", int, minimum=1)
    max_queue_delay_us: int = option(0, "--max-queue-delay-us", "batch window after the first request (0: batch "
                                     "only what is already queued)", int, minimum=0)
    front_order: str | None = option(None, "--front-order", "the ensemble's front (enserve.front): its members' "
                                     "names, comma-separated, in the order they are added when a latency objective "
                                     "leaves room, or 'cost' for cheapest first as measured here with ONNX Runtime "
                                     "on one core (default: no front, every request runs every member)", str)

    def validate(self) -> None:
        """ValueError naming the flag and the rule (before any file is read or written)."""
        check_fields(self)
        try:
            check_model_name(self.ensemble)
        except RepositoryError as exc:
            raise ValueError(f"--ensemble: {exc}") from None
        if self.front_order is not None and not self.front_order.strip():
            raise ValueError("--front-order is empty: name the members in order, or 'cost'")
        if self.batch_size > self.max_batch_size:
            raise ValueError(f"--batch-size is {self.batch_size}, above --max-batch-size {self.max_batch_size}")

    def front(self, names: list[str]) -> list[str] | str | None:
        """``front_order`` as ``import_onnx`` takes it: 'cost', the members' ``names`` in order, or None;
        ValueError when it does not name each member once."""
        if self.front_order is None:
            return None
        text = self.front_order.strip()
        if text.lower() == "cost":
            return "cost"
        order = [n.strip() for n in text.split(",")]
        try:
            check_order(order, names)
        except RepositoryError as exc:
            raise ValueError(f"--front-order {text!r}: {exc} (or 'cost')") from None
        return order


def import_onnx(
    files: list[Path],
    repository: Path,
    *,
    ensemble: str = DEFAULT_ENSEMBLE,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    queue_delay_us: int = 0,
    names: list[str] | None = None,
    weights: list[float] | None = None,
    combiner: str = combiners.DEFAULT,
    notes: dict[str, str] | None = None,
    front: list[FrontPoint] | None = None,
    front_order: list[str] | str | None = None,
) -> Repository:
    """Build (or add to) a repository from ONNX files and define ``ensemble`` over them, combined by
    ``combiner``; with ``weights`` (one per file), by the weighted combiner of the same space.
    ``notes`` become parameters of the ensemble's config (e.g. what its input expects); ``front``
    its nested points (``front``), checked as the server reads them; or ``front_order``: the members'
    names in the order their prefixes are served under a latency objective, or "cost" for cheapest
    first as measured here (``one_image_cost_s``)."""
    if not files:
        raise RepositoryError("no ONNX file given")
    for what, value, least in (("max_batch_size", max_batch_size, 1), ("batch_size", batch_size, 1),
                               ("queue_delay_us", queue_delay_us, 0)):
        if value < least:
            raise RepositoryError(f"{what} is {value}, but must be >= {least}")
    names = names or member_names(files)
    if len(names) != len(files):
        raise RepositoryError(f"{len(names)} names given for {len(files)} files")
    for n in [*names, ensemble]:
        check_model_name(n)
    if ensemble in names:
        raise RepositoryError(f"ensemble name '{ensemble}' is also a member name")
    members = []
    for f, n in zip(files, names):
        f = Path(f)
        if not f.is_file():
            raise RepositoryError(f"ONNX file '{f}' does not exist")
        inputs, outputs = read_onnx_signature(f)
        members.append(
            MemberSpec(n, f, inputs, outputs, max_batch_size, min(batch_size, max_batch_size), queue_delay_us)
        )
    check_compatible(members)
    if front is None and front_order is not None:  # before anything is written: a failure leaves no half repository
        front = ordered_front(names, [Path(f) for f in files], front_order)
    parsed = None if front is None else parse_front(front_text(front), names, f"ensemble '{ensemble}'")
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    for m in members:
        write_config(repository / m.name, member_config(m))
        (repository / m.name / "1").mkdir(exist_ok=True)
        shutil.copyfile(m.path, repository / m.name / "1" / "model.onnx")
    answering = len(names) if parsed is not None and len(parsed) > 1 else 0
    ens = EnsembleSpec(ensemble, names, members[0].inputs, ensemble_outputs(members[0].outputs, answering), max_batch_size,
                       notes=dict(notes or {}))
    try:
        ens.combiner = (combiners.weighted_twin(combiner) if weights is not None else combiners.get(combiner)).name
    except ValueError as exc:
        raise RepositoryError(str(exc)) from None
    if weights is not None:
        ens.weights = parse_weights(",".join(f"{w:.17g}" for w in weights), names, f"ensemble '{ensemble}'")
    if parsed is not None:
        ens.front = parsed
    write_config(repository / ensemble, ensemble_config(ens, {m.name: m for m in members}))
    (repository / ensemble / "1").mkdir(exist_ok=True)
    return load_repository(repository)


COST_SAMPLES = 2000  # the paper's C: seconds for this many samples on one core


def one_image_cost_s(path: Path, runs: int = 5) -> float:
    """Seconds one image takes through ``path`` on one core with ONNX Runtime (the best of a few
    runs after a warm-up)."""
    import time

    import numpy as np
    import onnxruntime as ort
    from tritonclient.utils import triton_to_np_dtype

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {t.name: np.zeros((1, *t.dims), np.dtype(triton_to_np_dtype(t.datatype)))
             for t in read_onnx_signature(path)[0]}
    session.run(None, feeds)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best


def ordered_front(names: list[str], files: list[Path], order: list[str] | str) -> list[FrontPoint]:
    """The prefixes of ``order`` (member names, or "cost": cheapest first, each member's cost
    measured) as a front."""
    if order == "cost":
        costs = {}
        for n, f in zip(names, files):
            try:
                costs[n] = COST_SAMPLES * one_image_cost_s(f)
            except Exception as exc:  # ONNX Runtime's own errors: the member cannot be run here
                raise RepositoryError(f"cannot measure the cost of member '{n}' ({f}) with ONNX Runtime: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}") from None
        order = sorted(names, key=lambda n: (costs[n], names.index(n)))
    else:
        costs = {}
        check_order(order, names)
    points, cost = [], 0.0
    for k, n in enumerate(order, 1):
        cost += costs.get(n, 0.0)
        points.append(FrontPoint(tuple(order[:k]), cost if costs else None))
    return points


def check_order(order: list[str], names: list[str]) -> None:
    """A front's order must name every member once; RepositoryError naming both."""
    if sorted(order) != sorted(names):
        raise RepositoryError(f"the front's order {list(order)} must name every member once: {names}")


def member_names(files) -> list[str]:
    """The member names ``import_onnx`` gives ``files``: their stems as model names, made unique."""
    return _unique_names([Path(f).stem for f in files])


def _unique_names(stems: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        s = re.sub(rf"[^{NAME_CHARS}]", "_", s).lstrip(".-").replace("..", "_") or "member"
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out

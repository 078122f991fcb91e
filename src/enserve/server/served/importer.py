"""A model repository from ONNX files: each file a member in Triton's layout, and an ensemble over
them (``enserve import``, the build's export, the demo)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from enserve import combiners
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
) -> Repository:
    """Build (or add to) a repository from ONNX files and define ``ensemble`` over them, combined by
    ``combiner``; with ``weights`` (one per file), by the weighted combiner of the same space.
    ``notes`` become parameters of the ensemble's config (e.g. what its input expects); ``front``
    its nested points (``front``), checked as the server reads them."""
    if not files:
        raise RepositoryError("no ONNX file given")
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size is {max_batch_size}, but must be >= 1")
    names = names or _unique_names([Path(f).stem for f in files])
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
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    for m in members:
        write_config(repository / m.name, member_config(m))
        (repository / m.name / "1").mkdir(exist_ok=True)
        shutil.copyfile(m.path, repository / m.name / "1" / "model.onnx")
    ens = EnsembleSpec(ensemble, names, members[0].inputs, ensemble_outputs(members[0].outputs), max_batch_size,
                       notes=dict(notes or {}))
    try:
        ens.combiner = (combiners.weighted_twin(combiner) if weights is not None else combiners.get(combiner)).name
    except ValueError as exc:
        raise RepositoryError(str(exc)) from None
    if weights is not None:
        ens.weights = parse_weights(",".join(f"{w:.17g}" for w in weights), names, f"ensemble '{ensemble}'")
    if front is not None:
        ens.front = parse_front(front_text(front), names, f"ensemble '{ensemble}'")
    write_config(repository / ensemble, ensemble_config(ens, {m.name: m for m in members}))
    (repository / ensemble / "1").mkdir(exist_ok=True)
    return load_repository(repository)


def _unique_names(stems: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        s = re.sub(rf"[^{NAME_CHARS}]", "_", s).lstrip(".-").replace("..", "_") or "member"
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out

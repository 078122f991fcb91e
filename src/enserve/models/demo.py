"""The demo repository: the synthetic CNNs as members of one ensemble, in Triton's layout."""

from __future__ import annotations

import tempfile
from pathlib import Path

from enserve.models.synthetic import DEFAULT_WIDTHS, write_tiny_cnns
from enserve.server.served.repository import DEFAULT_ENSEMBLE


def write_demo_repository(repository: Path, widths: tuple[int, ...] = DEFAULT_WIDTHS, *, force: bool = False) -> bool:
    """Write one member per width and their ensemble 'ensemble' into ``repository``; False (and
    nothing written) when it already holds an ensemble and ``force`` is off."""
    from enserve.server.served.importer import import_onnx

    repository = Path(repository)
    if (repository / DEFAULT_ENSEMBLE / "config.pbtxt").is_file() and not force:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        import_onnx(write_tiny_cnns(Path(tmp), widths), repository, ensemble=DEFAULT_ENSEMBLE)
    return True

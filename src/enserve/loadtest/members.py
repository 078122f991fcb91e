"""An ensemble's member ONNX files and their input, read from the repository's layout and the
ensemble's ``config.pbtxt`` (Triton's own message) without the server's code: the ceiling and the
baseline servers run these files directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from enserve.server.served.repository import DEFAULT_ENSEMBLE

ONNX_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple[int, ...]  # without the batch axis
    np_dtype: np.dtype


def member_files(repository: Path, ensemble: str = DEFAULT_ENSEMBLE) -> list[Path]:
    """``<repository>/<member>/1/model.onnx`` of every step of the ensemble (or of ``ensemble`` itself
    when it is a single model)."""
    repository = Path(repository)
    config_path = repository / ensemble / "config.pbtxt"
    try:
        config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ValueError(f"cannot read the config of '{ensemble}' at {config_path}: {exc}") from exc
    names = [step.model_name for step in config.ensemble_scheduling.step] or [ensemble]
    files = [repository / name / "1" / "model.onnx" for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"members of '{ensemble}' without an ONNX file: {missing}")
    return files


def input_of(session) -> InputSpec:
    """The first input of an ONNX Runtime session."""
    first = session.get_inputs()[0]
    return InputSpec(first.name, tuple(int(d) for d in first.shape[1:]), np.dtype(ONNX_TYPES[first.type]))


def output_of(session) -> tuple[str, tuple[int, ...]]:
    """The first output of an ONNX Runtime session: its name and dims (no batch axis)."""
    first = session.get_outputs()[0]
    return first.name, tuple(int(d) for d in first.shape[1:])

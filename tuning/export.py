"""Export a trained member to ONNX (dynamic batch axis, one file, named input and output, softmax
included), check it against PyTorch on held-out samples, and optimise it offline with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "probs"


class WithSoftmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, *, check: np.ndarray | None = None,
                atol: float = 1e-4) -> Path:
    """Write ``path``; if ``check`` samples are given, ONNX Runtime must match PyTorch within ``atol``."""
    import onnxruntime as ort

    wrapped = WithSoftmax(model).eval()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes={"x": {0: batch}}, external_data=False, dynamo=True, verbose=False)
    if check is not None and len(check):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: check.astype(np.float32)})[0]
        with torch.no_grad():
            want = wrapped(torch.from_numpy(check.astype(np.float32))).numpy()
        err = float(np.max(np.abs(got - want)))
        if err > atol:
            raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {err:g} (> {atol:g})")
    return path


def optimise_offline(path: Path, out: Path) -> Path:
    """ONNX Runtime's offline graph optimisation (extended level: portable across CPU types)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(out)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and if not, what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT engines skipped: the 'tensorrt' package is not installed (pip install 'enserve[gpu]')"
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False, "TensorRT engines skipped: onnxruntime has no TensorrtExecutionProvider (needs onnxruntime-gpu and a GPU)"
    return True, ""

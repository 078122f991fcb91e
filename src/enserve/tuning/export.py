"""Export a trained member to ONNX (dynamic batch axis, one file, named input and output, softmax
included), check it against PyTorch on held-out samples, and optimise it offline with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from enserve import combiners

INPUT_NAME = "input"
OUTPUT_NAME = "probs"


class WithSoftmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


EXPORTERS = ("torchscript", "dynamo")


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, *, check: np.ndarray | None = None,
                atol: float = 1e-4, exporter: str = "torchscript") -> Path:
    """Write ``path`` (one file, input ``input`` and output ``probs`` with a dynamic batch axis); if
    ``check`` samples are given, ONNX Runtime must match PyTorch within ``atol``.

    ``exporter``: "torchscript" (default: 0.14 s a model here against 1.6-2.1 s for "dynamo",
    torch.export's exporter; every trial of a search is exported, so this is search time) or "dynamo"."""
    import warnings

    import onnxruntime as ort

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter '{exporter}' is not one of {EXPORTERS}")
    wrapped = WithSoftmax(model).eval()
    example = torch.zeros(2, *input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "external_data": False}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.onnx.export(wrapped, (example,), str(path), dynamic_shapes={"x": {0: batch}}, dynamo=True,
                          verbose=False, **names)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 prefers dynamo; both are supported
            torch.onnx.export(wrapped, (example,), str(path), dynamic_axes={INPUT_NAME: {0: "batch"},
                              OUTPUT_NAME: {0: "batch"}}, dynamo=False, **names)
    if check is not None and len(check):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: check.astype(np.float32)})[0]
        with torch.no_grad():
            want = wrapped(torch.from_numpy(check.astype(np.float32))).numpy()
        err = float(np.max(np.abs(got - want)))
        if err > atol:
            raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {err:g} (> {atol:g})")
    return path


def optimise_offline(path: Path, out: Path, *, for_gpu: bool = False) -> Path:
    """ONNX Runtime's offline graph optimisation. Extended level (fusions into ORT's CPU kernels,
    portable across CPU types) for CPU serving; basic level (constant folding, redundant nodes: no
    execution-provider-specific operators) when the model may run on a GPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_BASIC if for_gpu else level.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(out)


def tensorrt_available() -> tuple[bool, str]:
    """Whether served TensorRT engines can be built here, and if not, what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT engines skipped: the 'tensorrt' package is not installed (pip install 'enserve[gpu]')"
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False, ("TensorRT engines skipped: this onnxruntime has no TensorRT provider "
                       "(install onnxruntime-gpu: pip install 'enserve[gpu]')")
    from enserve.optimizer.devices import gpus

    if not gpus():
        return False, "TensorRT engines skipped: no NVIDIA GPU is visible (NVML found none, or nvidia-ml-py is missing)"
    return True, ""


def build_engine(onnx_path: Path, input_dims: tuple[int, ...], max_batch_size: int, device: str = "gpu:0") -> Path:
    """The member's TensorRT engine, built now into the cache its workers load it from
    (``optimizer.engines``): a session with the TensorRT provider run at batch 1 and at the
    largest batch, so the engine's shape range covers every batch served."""
    from enserve.optimizer import engines
    from enserve.optimizer.sessions import session_for

    session = session_for(str(onnx_path), threads=1, device=device, what=f"member {onnx_path.parent.parent.name}")
    name = session.get_inputs()[0].name
    for batch in sorted({1, max(1, max_batch_size)}):
        session.run(None, {name: np.zeros((batch, *input_dims), np.float32)})
    index = int(device.partition(":")[2] or 0)
    return engines.engine_dir(onnx_path, engines.gpu_model(index), engines.tensorrt_version() or "unknown")


def input_notes(library: Path) -> dict[str, str]:
    """What the served ensemble's config says of its input and classes (``INPUT_NOTE``,
    ``CLASSES_NOTE``), from the library's data set and preprocessing."""
    from enserve.server.served.repository import CLASSES_NOTE, INPUT_NOTE
    from enserve.tuning import preprocess
    from enserve.tuning.library import library_dataset

    fp = library_dataset(library) or {}
    learned = preprocess.read(library) or {}
    shape = fp.get("shapes", {}).get("x_train", [None])[1:]
    columns = fp.get("columns") or []
    note = f"raw values as in the training data, shape {shape}"
    if columns:
        note += f": {len(columns)} columns in this order: {', '.join(columns)}"
    kinds = {p.kind for p in learned.values()}
    if kinds == {"per_column"}:
        note += "; a missing value is NaN (imputed with the training median inside every member)"
    elif "per_column" in kinds:  # rows searched as a signal too: the data had no missing value
        note += "; no value may be missing (NaN): the signal networks do not impute"
    if learned:
        note += "; centring and scaling run inside every member (learned from the training split)"
    notes = {INPUT_NOTE: note}
    if fp.get("class_names"):
        notes[CLASSES_NOTE] = ",".join(fp["class_names"])
    return notes


def export_members(library: Path, names: list[str], models: list[Path], repository: Path, ensemble: str,
                   progress=print, weights: list[float] | None = None, combiner: str = combiners.DEFAULT,
                   front: list | None = None) -> None:
    """The export stage: optimise the chosen trials' ONNX files offline, write them into a model
    repository as members of ``ensemble``, and build their TensorRT engines (``build_engine``)
    where TensorRT and a GPU are present. ``names`` and ``models``: each member's name and ONNX file;
    ``front``: the ensemble's nested points (``enserve.server.served.front.FrontPoint``)."""
    import tempfile

    from enserve.optimizer.devices import gpus
    from enserve.server.served.importer import import_onnx
    for_gpu = bool(gpus())
    with tempfile.TemporaryDirectory() as tmp:
        files = [optimise_offline(m, Path(tmp) / f"{name}.onnx", for_gpu=for_gpu) for m, name in zip(models, names)]
        repo = import_onnx(files, repository, ensemble=ensemble, names=names, weights=weights, combiner=combiner,
                           notes=input_notes(library), front=front)
    progress(f"members optimised offline by ONNX Runtime ({'basic level: a GPU is present' if for_gpu else 'extended level'})")
    ok, why = tensorrt_available()
    if not ok:
        progress(why)
        return
    built = [build_engine(Path(repository) / name / "1" / "model.onnx", repo.members[name].inputs[0].dims,
                          repo.members[name].max_batch_size) for name in names]
    progress(f"TensorRT engines built for {len(built)} members into <member>/1/engines/{built[0].name}/ "
             "(served by ONNX Runtime's TensorRT provider)")

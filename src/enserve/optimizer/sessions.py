"""The one ONNX Runtime session factory: workers, the profiler and the benchmark baselines all open
members through it, so that what the allocator measures is what is served.

Every session gets ``threads`` intra-op threads, one inter-op thread, sequential execution, all
graph optimisations and no spinning (with several sessions on few cores a spinning pool steals
the cores its neighbours need). A GPU device asks for CUDA, and for TensorRT with the member's
engine cache when both are present (``engines``); it says what is missing when CUDA is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

from enserve.optimizer import engines


def session_options(threads: int):
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"intra-op threads is {threads}, but must be >= 1")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cuda_device_id(index: int) -> int:
    """The CUDA ordinal of physical GPU ``index`` in this process: 0 in a worker whose environment
    shows it that GPU alone (``CUDA_VISIBLE_DEVICES``), else the index itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return 0 if visible is not None and visible.split(",") == [str(index)] else index


def providers_for(device: str, what: str = "the model", model_path: str | Path | None = None) -> list:
    """Execution providers for ``device`` ("cpu" or "gpu[:i]"); raises with what is missing. On a GPU
    with ONNX Runtime's TensorRT provider and TensorRT, the member's engine is served from (and on
    first use built into) its cache ``engines.engine_dir``."""
    import onnxruntime as ort

    if not device.startswith("gpu"):
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"{what} is placed on {device}, but onnxruntime offers only {available}: install "
            "onnxruntime-gpu (pip install 'enserve[gpu]') on a machine with an NVIDIA driver, or place "
            "it on a CPU device"
        )
    index = int(device.partition(":")[2] or 0)
    device_id = cuda_device_id(index)
    providers: list = [("CUDAExecutionProvider", {"device_id": str(device_id)}), "CPUExecutionProvider"]
    trt = engines.tensorrt_version()
    if "TensorrtExecutionProvider" in available and trt is not None and model_path is not None:
        cache = engines.writable_engine_dir(model_path, engines.gpu_model(index), trt)
        providers.insert(0, ("TensorrtExecutionProvider", engines.tensorrt_options(cache, device_id)))
    return providers


def session_for(path: str, *, threads: int, device: str = "cpu", what: str | None = None):
    """An ``onnxruntime.InferenceSession`` for the model at ``path`` on ``device``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads),
                                providers=providers_for(device, what or f"model {path}", path))

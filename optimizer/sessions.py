"""The one ONNX Runtime session factory: workers, the profiler and the benchmark baselines all open
members through it, so that what the allocator measures is what is served.

Every session gets ``threads`` intra-op threads, one inter-op thread, sequential execution, all
graph optimisations and no spinning (with several sessions on few cores a spinning pool steals
the cores its neighbours need). A GPU device asks for CUDA (and TensorRT when present) and says
what is missing when it is not there.
"""

from __future__ import annotations


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


def providers_for(device: str, what: str = "the model") -> list[str]:
    """Execution providers for ``device`` ("cpu" or "gpu[:i]"); raises with what is missing."""
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
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in available:
        providers.insert(0, "TensorrtExecutionProvider")
    return providers


def session_for(path: str, *, threads: int, device: str = "cpu", what: str | None = None):
    """An ``onnxruntime.InferenceSession`` for the model at ``path`` on ``device``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads),
                                providers=providers_for(device, what or f"model {path}"))

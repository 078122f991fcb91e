"""TensorRT engines that are served: ONNX Runtime's TensorRT provider builds a member's engine on
its first GPU session and keeps it in ``<member>/1/engines/<key>/``, keyed by the GPU model and
the TensorRT version; every later session (the profiler's, each worker's) loads it from there. A
GPU or TensorRT of another kind gets another key, so its engine is built anew, never misused.
Without a GPU nothing is written."""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

__all__ = ["engine_dir", "engine_key", "gpu_model", "tensorrt_options", "tensorrt_version", "writable_engine_dir"]


def engine_key(gpu: str, trt_version: str) -> str:
    """'NVIDIA H200', '10.3.0' -> 'nvidia-h200.trt10.3.0': file-name safe, one per GPU model and
    TensorRT version."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version).strip("-") or "unknown"
    return f"{slug}.trt{version}"


def engine_dir(model_path: str | Path, gpu: str, trt_version: str) -> Path:
    """Where the engine of the ONNX model at ``model_path`` lives for this GPU model and TensorRT."""
    return Path(model_path).parent / "engines" / engine_key(gpu, trt_version)


def writable_engine_dir(model_path: str | Path, gpu: str, trt_version: str) -> Path:
    """``engine_dir``, made if missing; when the repository is read-only (a container's volume) and
    holds no engine for this key, a folder of its own under the temporary directory instead."""
    cache = engine_dir(model_path, gpu, trt_version)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        digest = hashlib.sha256(str(Path(model_path).resolve()).encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir()) / "enserve-engines" / digest / engine_key(gpu, trt_version)
        cache.mkdir(parents=True, exist_ok=True)
    return cache


def tensorrt_options(cache: Path, device_id: int = 0, workspace_bytes: int = 2 << 30) -> dict[str, str]:
    """The TensorRT provider's options: engines and timing caches in ``cache`` (built once, then
    loaded), FP32 as the ONNX members (answers must match the CPU's)."""
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "False",
        "trt_max_workspace_size": str(workspace_bytes),
    }


def tensorrt_version() -> str | None:
    """The TensorRT runtime's version (its Python package), or None without it."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def gpu_model(index: int) -> str:
    """The model name of GPU ``index`` (NVML's numbering), or 'gpu' when NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no such index: the key still separates TensorRT versions
        return "gpu"
    return name.decode() if isinstance(name, bytes) else str(name)

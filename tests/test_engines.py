"""TensorRT engines that are served: their keys and cache options (known answers), and the CPU path,
which asks for no GPU provider and writes nothing. The GPU path itself needs a GPU machine."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

from enserve.optimizer import engines
from enserve.optimizer.sessions import cuda_device_id, providers_for


def test_engines_are_keyed_by_gpu_model_and_tensorrt_version():
    assert engines.engine_key("NVIDIA H200", "10.3.0") == "nvidia-h200.trt10.3.0"
    assert engines.engine_key("Tesla T4", "8.6.1.post1") == "tesla-t4.trt8.6.1.post1"
    assert engines.engine_key("", "") == "gpu.trtunknown"
    assert engines.engine_dir("/repo/cnn_a/1/model.onnx", "NVIDIA A100-SXM4-80GB", "10.0") == \
        Path("/repo/cnn_a/1/engines/nvidia-a100-sxm4-80gb.trt10.0")
    assert engines.engine_key("NVIDIA H200", "10.3.0") != engines.engine_key("NVIDIA H200", "10.4.0")


def test_the_tensorrt_provider_caches_its_engine_in_the_members_folder():
    options = engines.tensorrt_options(Path("/repo/m/1/engines/k"), device_id=0)
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == "/repo/m/1/engines/k"
    assert options["trt_fp16_enable"] == "False" and options["device_id"] == "0"


def test_a_worker_sees_its_gpu_as_device_0(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert cuda_device_id(2) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert cuda_device_id(2) == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_device_id(1) == 1


def test_on_a_cpu_machine_sessions_ask_for_no_gpu_and_write_nothing(tmp_path):
    model = tmp_path / "m" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    assert providers_for("cpu", "member 'm'", model) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the CPU-only refusal cannot be checked here")
    with pytest.raises(RuntimeError, match=r"member 'm' is placed on gpu:1, but onnxruntime offers only .*"
                                           r"install onnxruntime-gpu"):
        providers_for("gpu:1", "member 'm'", model)
    assert not (model.parent / "engines").exists()


def test_a_read_only_repository_gets_its_engines_cached_elsewhere(tmp_path):
    model = tmp_path / "m" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    assert engines.writable_engine_dir(model, "NVIDIA H200", "10.3") == model.parent / "engines" / "nvidia-h200.trt10.3"
    blocked = tmp_path / "ro" / "1" / "model.onnx"
    blocked.parent.mkdir(parents=True)
    (blocked.parent / "engines").write_text("a file where the folder would go")  # mkdir fails, as on a read-only volume
    elsewhere = engines.writable_engine_dir(blocked, "NVIDIA H200", "10.3")
    assert elsewhere.is_dir() and elsewhere.name == "nvidia-h200.trt10.3" and "enserve-engines" in elsewhere.parts
    shutil.rmtree(elsewhere.parent)
    with contextlib.suppress(OSError):  # the shared root, if no other engines live there
        elsewhere.parent.parent.rmdir()

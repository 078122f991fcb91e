"""A trial end to end on digits: train, prune on report, export to ONNX and serve-ready checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the 'tune' extra (torch) is not installed")

from models.mlp import MLPConfig  # noqa: E402
from models.resnet import ResNetConfig  # noqa: E402
from tuning.augment import Augmentation  # noqa: E402
from tuning.data import load_dataset  # noqa: E402
from tuning.export import export_onnx, optimise_offline, tensorrt_available  # noqa: E402
from tuning.train import TrialConfig, TrialDiverged, build_model, evaluate, predict, train  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_resnet_learns_digits_and_exports(digits, tmp_path):
    torch.manual_seed(0)
    cfg = TrialConfig(ResNetConfig(filters=8, filter_step=8, in_channels=1, classes=10),
                      learning_rate=0.01, batch_size=32, augmentation=Augmentation(translation=0.1))
    model = build_model(cfg.network)
    result = train(model, digits, cfg, epochs=3)
    assert result.epochs == 3 and len(result.curve) == 3
    loss, error = evaluate(model, digits.x_test, digits.y_test)
    assert error < 0.2, result.curve  # 10 classes: chance is 0.9
    path = export_onnx(model, digits.input_shape, tmp_path / "m.onnx", check=digits.x_test[:50])
    import onnxruntime as ort

    session = ort.InferenceSession(str(optimise_offline(path, tmp_path / "m.opt.onnx")))
    for n in (1, 7):
        got = session.run(None, {"input": digits.x_test[:n]})[0]
        np.testing.assert_allclose(got, predict(model, digits.x_test[:n]), atol=1e-4)
    from server.repository import read_onnx_signature

    inputs, outputs = read_onnx_signature(path)  # what `enserve import` accepts
    assert inputs[0].name == "input" and inputs[0].dims == (1, 8, 8) and outputs[0].dims == (10,)


def test_report_can_stop_a_trial_and_divergence_is_detected(digits):
    cfg = TrialConfig(MLPConfig(features=64, classes=10, hidden=(16,)), learning_rate=0.01)
    model = build_model(cfg.network)
    seen = []
    result = train(model, digits, cfg, epochs=5, report=lambda e, loss: seen.append(e) or e == 2)
    assert result.pruned and result.epochs == 2 and seen == [1, 2]
    bad = TrialConfig(MLPConfig(features=64, classes=10, hidden=(16,)), learning_rate=1e30)
    with pytest.raises(TrialDiverged, match="training loss became"):
        train(build_model(bad.network), digits, bad, epochs=3)


def test_tensorrt_absence_is_explained():
    ok, why = tensorrt_available()
    assert ok or "TensorRT engines skipped" in why

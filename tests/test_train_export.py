"""A trial end to end on digits: train, prune on report, export to ONNX and serve-ready checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the 'tune' extra (torch) is not installed")

from enserve.models.mlp import MLPConfig  # noqa: E402
from enserve.models.resnet import ResNetConfig  # noqa: E402
from enserve.tuning.augment import Augmentation  # noqa: E402
from enserve.tuning.data import load_dataset  # noqa: E402
from enserve.tuning.export import export_onnx, optimise_offline, tensorrt_available  # noqa: E402
from enserve.tuning.train import TrialConfig, TrialDiverged, build_model, evaluate, predict, train  # noqa: E402


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
    import onnxruntime as ort

    for exporter in ("torchscript", "dynamo"):
        path = export_onnx(model, digits.input_shape, tmp_path / f"{exporter}.onnx", check=digits.x_test[:50],
                           exporter=exporter)
        for for_gpu in (False, True):
            opt = optimise_offline(path, tmp_path / f"{exporter}.{for_gpu}.opt.onnx", for_gpu=for_gpu)
            session = ort.InferenceSession(str(opt))
            for n in (1, 7, 300):
                got = session.run(None, {"input": digits.x_test[:n]})[0]
                np.testing.assert_allclose(got, predict(model, digits.x_test[:n]), atol=1e-4)
    with pytest.raises(ValueError, match="exporter 'jit' is not one of"):
        export_onnx(model, digits.input_shape, tmp_path / "x.onnx", exporter="jit")
    from enserve.server.served.repository import read_onnx_signature

    inputs, outputs = read_onnx_signature(path)  # what `enserve import` accepts
    assert inputs[0].name == "input" and inputs[0].dims == (1, 8, 8) and outputs[0].dims == (10,)


def test_learning_rate_follows_a_cosine_over_the_whole_budget(digits):
    cfg = TrialConfig(MLPConfig(features=64, classes=10, hidden=(16,)), learning_rate=0.004, batch_size=64)
    full = train(build_model(cfg.network), digits, cfg, epochs=4)
    # after epoch e of 4 the rate is 0.004 * (1 + cos(pi e / 4)) / 2
    np.testing.assert_allclose([c["learning_rate"] for c in full.curve],
                               [0.004 * (1 + np.cos(np.pi * e / 4)) / 2 for e in (1, 2, 3, 4)], atol=1e-12)
    stopped = train(build_model(cfg.network), digits, cfg, epochs=4, schedule_epochs=8,
                    report=lambda epoch, loss: epoch == 2)  # a pruner stops it half-way through its rungs
    assert stopped.pruned and stopped.curve[-1]["learning_rate"] == pytest.approx(0.004 * (1 + np.cos(np.pi / 4)) / 2)
    with pytest.raises(ValueError, match="epochs is 0, but must be >= 1"):
        train(build_model(cfg.network), digits, cfg, epochs=0)
    with pytest.raises(ValueError, match="schedule_epochs is 3, but must be >= start_epoch"):
        train(build_model(cfg.network), digits, cfg, epochs=4, schedule_epochs=3)


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

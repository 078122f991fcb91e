"""Small CNN classifiers written directly as ONNX graphs (no PyTorch needed).

They give a serving-only install a default ensemble and the tests real, different-sized
members: conv(3x3)-relu-pool, conv-relu-pool, conv-relu, global average pool, dense, softmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "probs"
DEFAULT_WIDTHS = (12, 20, 32, 56)


def tiny_cnn(
    width: int,
    *,
    seed: int,
    channels: int = 3,
    image_size: int = 32,
    classes: int = 10,
):
    """An ``onnx.ModelProto`` CNN with first-layer ``width`` filters and random He weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = []
    nodes = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name))
        return name

    def bias(name: str, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.05).astype(np.float32), name))
        return name

    x = INPUT_NAME
    c_in = channels
    for i, (c_out, pool) in enumerate(((width, True), (2 * width, True), (4 * width, False))):
        w = weight(f"conv{i}.w", (c_out, c_in, 3, 3), c_in * 9)
        b = bias(f"conv{i}.b", c_out)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
        if pool:
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
        c_in = c_out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    w = weight("fc.w", (c_in, classes), c_in)
    b = bias("fc.b", classes)
    nodes.append(helper.make_node("Gemm", ["flat", w, b], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        f"tiny_cnn_w{width}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="enserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_cnns(directory: Path, widths: tuple[int, ...] = DEFAULT_WIDTHS, *, seed: int = 0) -> list[Path]:
    """Write one ``cnn_w<width>.onnx`` per width (``cnn_w<width>_<k>`` for the k-th repeat) into
    ``directory``, each with its own random weights; return the paths."""
    import onnx

    if not widths or min(widths) < 1:
        raise ValueError(f"widths are {list(widths)}, but must be one or more integers >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, w in enumerate(widths):
        repeat = widths[:i].count(w)
        p = directory / (f"cnn_w{w}_{repeat + 1}.onnx" if repeat else f"cnn_w{w}.onnx")
        onnx.save(tiny_cnn(w, seed=seed + i), str(p))
        paths.append(p)
    return paths

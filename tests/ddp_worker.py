"""Run by torchrun from test_train.py: trains the same small VAE on every rank, saves its state."""

import sys

import torch

from crvae_ext.train import TrainConfig, _world, init_distributed, train

sys.path.insert(0, sys.argv[2])
from train_setup import small_data, small_vae

init_distributed()
rank, world = _world()
model = small_vae()
history = train(model, small_data(), TrainConfig(epochs=2, batch_size=32, lr=1e-3, progress=False))
torch.save(
    {"state": model.state_dict(), "history": history, "world": world},
    f"{sys.argv[1]}/rank{rank}.pt",
)

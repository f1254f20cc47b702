"""A training step of the paper's VAE: LipLinear + GroupSort per backend vs nn.Linear + ReLU."""

import pytest
import torch

from .cases import vae_step_group

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUP = vae_step_group(128, DEVICE)


@pytest.mark.parametrize("case", list(GROUP.cases))
def test_vae_step(benchmark, case):
    benchmark.group = GROUP.title
    benchmark.pedantic(GROUP.cases[case], rounds=10, warmup_rounds=2, iterations=1)

"""A training step of the paper's VAE: LipLinear + GroupSort per backend vs nn.Linear + ReLU."""

import pytest
import torch

from .cases import vae_step_group
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = [vae_step_group(128, DEVICE)]


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_vae_step(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)

"""LipLinear (spectral, per backend; Björck) vs nn.Linear, torch's spectral_norm and deel-torchlip:
train step, forward and backward, the way a hidden layer trains."""

import pytest
import torch

from .cases import liplinear_groups
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = liplinear_groups(256, 1024, DEVICE)


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_lip_linear(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)

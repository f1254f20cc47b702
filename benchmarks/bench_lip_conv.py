"""LipConv2d vs nn.Conv2d, torch's spectral_norm, deel-torchlip and orthogonium: train step."""

import pytest
import torch

from .cases import lip_conv_group
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = [lip_conv_group(128, 64, 32, DEVICE)]


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_lip_conv(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)

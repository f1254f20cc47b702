"""power_iteration per backend vs two torch matvecs per step (the reference reads W twice)."""

import pytest
import torch

from .cases import power_iteration_group
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = [power_iteration_group(n, DEVICE, n_iters=k) for n in (1024, 4096) for k in (1, 10)]


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_power_iteration(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)

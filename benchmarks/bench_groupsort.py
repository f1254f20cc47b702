"""GroupSort fwd+bwd per backend vs ReLU fwd+bwd (same bytes) and the torch.sort way; the
forward alone and the backward alone vs ReLU's."""

import pytest
import torch

from .cases import groupsort_backward_group, groupsort_forward_group, groupsort_group
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = [
    groupsort_group(rows, cols, DEVICE, group_size=g)
    for rows, cols in [(256, 1024), (1024, 4096)]
    for g in (2, 4)
] + [groupsort_forward_group(256, 1024, DEVICE), groupsort_backward_group(256, 1024, DEVICE)]


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_groupsort(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)

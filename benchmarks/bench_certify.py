"""certify throughput, and our batched attack vs the paper's per-image scipy L-BFGS-B loop."""

import pytest
import torch

from .cases import attack_group, attack_strength, certify_group, certify_tight_group
from .harness import case_id, pytest_cases, run_benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUPS = [
    certify_group(1024, DEVICE),
    certify_tight_group(128, DEVICE),
    attack_group(4, 1.0, DEVICE),
]


@pytest.mark.parametrize(("group", "case"), pytest_cases(GROUPS), ids=case_id)
def bench_certify(benchmark, group, case):
    run_benchmark(benchmark, group, case, DEVICE)


def test_attack_strength_is_at_least_the_peers():
    damage = attack_strength(4, 1.0, DEVICE)
    assert damage["max_damage_batched"] >= damage["lbfgsb_per_image"]

"""certify throughput, and our batched attack vs the paper's per-image scipy L-BFGS-B loop."""

import pytest
import torch

from .cases import attack_group, attack_strength, certify_group

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", ["encode", "certify"])
def test_certify(benchmark, case):
    group = certify_group(1000, DEVICE)
    benchmark.group = group.title
    benchmark.pedantic(group.cases[case], rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("case", ["lbfgsb_per_image", "max_damage_batched"])
def test_attack(benchmark, case):
    group = attack_group(4, 1.0, DEVICE)
    benchmark.group = group.title
    benchmark.pedantic(group.cases[case], rounds=2, warmup_rounds=0, iterations=1)


def test_attack_strength_is_at_least_the_peers():
    damage = attack_strength(4, 1.0, DEVICE)
    assert damage["max_damage_batched"] >= damage["lbfgsb_per_image"]

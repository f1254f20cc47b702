"""The benchmark tooling: saved-memory accounting, target verdicts, the compare report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from benchmarks import cases, compare, targets
from benchmarks.harness import saved_activation_bytes
from crvae_ext import reference

ROOT = Path(__file__).resolve().parents[1]


def test_saved_bytes_count_activations_not_parameters():
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    linear = nn.Linear(16, 32)
    assert saved_activation_bytes(lambda: linear(x)) == x.nbytes  # x saved, W^T (a view) not
    # spectral_norm keeps a normalised copy of W for the backward, on top of x
    normed = spectral_norm(nn.Linear(16, 32))
    assert saved_activation_bytes(lambda: normed(x)) >= x.nbytes + linear.weight.nbytes
    assert saved_activation_bytes(lambda: torch.relu(x)) == x.nbytes  # its output


def _row(group: str, case: str, ratio: float) -> dict:
    return {"group": group, "case": case, "ratio": ratio, "gbps": 1.0}


def test_verdicts_judge_ratios_against_the_limits():
    rows = [
        _row("groupsort fwd+bwd 256x1024 G=2 fp32", "groupsort[cpp]", 1.29),
        _row("groupsort fwd+bwd 1024x4096 G=2 fp32", "groupsort[cpp]", 1.31),
        _row("groupsort fwd+bwd 1024x4096 G=4 fp32", "groupsort[cpp]", 9.0),  # no target
        _row("power_iteration 4096x4096 fp32 (1 step)", "power_iteration[cpp]", 0.7),
        _row("liplinear train B=256 1024x1024 fp32", "liplinear_spectral[cpp]", 1.04),
    ]
    judged = targets.verdicts(rows, "cpu", None)
    met = {r["group"]: r["met"] for r in judged}
    assert met == {rows[4]["group"]: True, rows[0]["group"]: True, rows[1]["group"]: False,
                   rows[3]["group"]: False}  # fmt: skip
    assert {r["name"] for r in judged} == {
        "groupsort_vs_relu",
        "power_iteration_vs_matvecs",
        "liplinear_vs_linear",
    }
    assert "**missed**" in targets.markdown(judged)
    assert targets.verdicts(rows, "cuda", None) == []


def test_compare_runs_one_group_and_writes_reports(tmp_path):
    out, raw = tmp_path / "report.md", tmp_path / "report.json"
    args = ["--only", "power_iteration 1024", "--rounds", "2", "--out", str(out)]
    assert compare.main([*args, "--json", str(raw)]) == 0
    report = json.loads(raw.read_text())
    cases = {r["case"]: r for r in report["rows"]}
    assert {"torch_matvec", "power_iteration[torch]"} <= set(cases)
    assert cases["torch_matvec"]["ratio"] == 1
    assert all(r["group"].startswith("power_iteration 1024x1024") for r in report["rows"])
    text = out.read_text()
    assert report["environment"]["torch"] in text and "| power_iteration[torch] |" in text
    again = tmp_path / "again.md"
    assert compare.main(["--render", str(raw), "--out", str(again)]) == 0
    assert again.read_text() == text
    if "power_iteration[cpp]" in cases:
        assert [t["name"] for t in report["targets"]] == ["power_iteration_vs_matvecs"]


def test_pytest_benchmark_files_run_and_print_ratios():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "benchmarks/bench_power_iteration.py", "-k", "1024x1024 and not steps"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    summary = done.stdout.split("median time / baseline", 1)[1]
    assert (
        "baseline bench_power_iteration[power_iteration 1024x1024 fp32 (1 step)-torch_matvec]"
        in summary
    )
    assert "-power_iteration[torch]]" in summary


def test_groupsort_backward_group_times_each_backward():
    """Each case of the backward-alone group is its op's gradient (ReLU's mask, GroupSort's
    routing by the reference), again on every call over the kept graph."""
    group = cases.groupsort_backward_group(4, 8, "cpu")
    torch.manual_seed(0)  # the group's own draws, in its order
    x = torch.randn(4, 8)
    grad = torch.randn_like(x)
    for name, case in group.cases.items():
        want = grad * (x > 0) if name == "relu" else reference.groupsort_backward(grad, x, 2, 1)
        for _ in range(2):
            assert torch.equal(case()[0], want), name

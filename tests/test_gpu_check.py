"""benchmarks/gpu_check.py, the one command for the GPU checks: refuses cleanly without CUDA,
and its whole pipeline runs on tiny CPU shapes under the Triton interpreter (--dry-run)."""

import json

import pytest
import torch

from benchmarks import gpu_check
from crvae_ext import _backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_refuses_without_cuda(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    _backend.unusable_reason("triton", "cpu") is not None, reason="needs the Triton interpreter"
)
def test_dry_run_writes_results(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*.json")
    results = json.loads(report.read_text())
    assert results["environment"]["torch"] == torch.__version__
    assert {"groupsort", "power_iteration", "liplinear", "verdicts"} <= results.keys()
    assert "errors" not in results
    assert all(row["triton_ms"] > 0 for row in results["groupsort"])
    assert "lip_linear_gemm_variant" in results["verdicts"]
    assert report.with_suffix(".md").read_text().startswith("# Triton backend GPU check")

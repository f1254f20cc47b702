"""The issues' performance targets, judged against one ``compare`` run's rows: met or missed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gpu_check
from .harness import md_cell


@dataclass(frozen=True)
class Target:
    """``case`` in groups whose title starts with ``group``: a time ratio to the group's baseline
    at most ``limit`` or, with ``bandwidth``, at least ``limit`` of the GPU's peak bandwidth."""

    issue: int
    device: str
    group: str
    case: str
    limit: float
    bandwidth: bool = False
    label: str | None = None

    def text(self) -> str:
        if self.label is not None:
            return f"{self.label} ({self.group})"
        if self.bandwidth:
            return f"{self.case} >= {self.limit:.0%} of peak bandwidth ({self.group})"
        return f"{self.case} <= {self.limit:g}x baseline ({self.group})"


def _liplinear(issue: int, device: str, backend: str, dtype: str, limit: float = 1.05) -> Target:
    return Target(issue, device, f"liplinear train B=256 1024x1024 {dtype}",
                  f"liplinear_spectral[{backend}]", limit)  # fmt: skip


PI = "power_iteration[cpp] >= 1.5x faster than two matvecs"
TARGETS = (
    _liplinear(2, "cpu", "cpp", "fp32", 1.10),  # the foundation's target, default backend
    _liplinear(2, "cpu", "torch", "fp32", 1.10),  # ... and the plain-PyTorch reference path
    _liplinear(4, "cpu", "cpp", "fp32"),
    Target(4, "cpu", "groupsort fwd+bwd 256x1024 G=2 fp32", "groupsort[cpp]", 1.3),
    Target(4, "cpu", "groupsort fwd+bwd 1024x4096 G=2 fp32", "groupsort[cpp]", 1.3),
    *(
        Target(4, "cpu", f"power_iteration {n}x{n} fp32", "power_iteration[cpp]", 1 / 1.5, label=PI)
        for n in (1024, 4096)
    ),
    _liplinear(3, "cuda", "triton", "fp32"),
    _liplinear(3, "cuda", "triton", "bf16"),
    Target(3, "cuda", "groupsort fwd+bwd 4096x4096 G=2 fp32", "groupsort[triton]", 1.2),
    Target(3, "cuda", "groupsort fwd+bwd 4096x4096 G=2 fp32", "groupsort[triton]", 0.85, True),
    Target(3, "cuda", "power_iteration 4096x4096 fp32", "power_iteration[triton]", 0.8, True),
)


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """A CUDA device's peak memory bandwidth in GB/s (None elsewhere)."""
    if device.type != "cuda":
        return None
    return gpu_check.peak_bandwidth_gbs(torch.cuda.get_device_properties(device))


def verdicts(rows: list[dict], device_type: str, peak: float | None) -> list[dict]:
    """One verdict per target of ``device_type`` whose group was measured in ``rows``;
    ``peak`` is the device's bandwidth in GB/s (None: bandwidth targets cannot be judged)."""
    out = []
    for target in TARGETS:
        if target.device != device_type:
            continue
        for row in rows:
            if row["case"] != target.case or not row["group"].startswith(target.group):
                continue
            if target.bandwidth:
                value = row["gbps"] / peak if peak and row["gbps"] else None
                met = value is not None and value >= target.limit
                shown = "no peak known" if value is None else f"{value:.0%} of {peak:.0f} GB/s"
            else:
                value = row["ratio"]
                met = value <= target.limit
                shown = f"{value:.3f}x"
            out.append({"issue": target.issue, "target": target.text(), "group": row["group"],
                        "measured": shown, "met": met})  # fmt: skip
    return out


def markdown(results: list[dict]) -> str:
    """The verdicts as a markdown table (empty when no target applies to this run)."""
    if not results:
        return ""
    lines = ["| issue | target | measured | verdict |", "|---|---|---|---|"]
    for r in results:
        verdict = "met" if r["met"] else "**missed**"
        lines.append(f"| #{r['issue']} | {md_cell(r['target'])} | {r['measured']} | {verdict} |")
    return "\n".join(lines)

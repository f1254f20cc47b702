"""Every performance target, CPU and GPU, in one place: judged against one ``compare`` run's
rows (met or missed) and read by ``gpu_check`` for its own verdicts.

Targets are keyed by what they measure (``name``), one limit each; the issues that set them
are history, not keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .harness import md_cell


@dataclass(frozen=True)
class Target:
    """``case`` in groups whose title starts with ``group``: a time ratio to the group's baseline
    at most ``limit`` or, with ``bandwidth``, at least ``limit`` of the GPU's peak bandwidth."""

    name: str
    device: str
    group: str
    case: str
    limit: float
    bandwidth: bool = False
    label: str | None = None
    throughput: bool = False  # limit: inputs per second, at least

    def text(self) -> str:
        if self.label is not None:
            return f"{self.label} ({self.group})"
        if self.bandwidth:
            return f"{self.case} >= {self.limit:.0%} of peak bandwidth ({self.group})"
        if self.throughput:
            return f"{self.case} >= {self.limit:g} inputs/s ({self.group})"
        return f"{self.case} <= {self.limit:g}x baseline ({self.group})"


def _liplinear(name: str, device: str, backend: str, dtype: str, limit: float) -> Target:
    return Target(
        name,
        device,
        f"liplinear train B=256 1024x1024 {dtype}",
        f"liplinear_spectral[{backend}]",
        limit,
    )


PI = "power_iteration[cpp] >= 1.5x faster than two matvecs"
GS_4096 = "groupsort fwd+bwd 4096x4096 G=2 fp32"
CERTIFY = "certify 1024 inputs in batches of 128"
TARGETS = (
    _liplinear("liplinear_vs_linear", "cpu", "cpp", "fp32", 1.05),
    _liplinear("liplinear_reference_vs_linear", "cpu", "torch", "fp32", 1.10),
    # a group prefix: the dense, expanded and transposed gradient groups are each judged
    Target(
        "groupsort_vs_relu", "cpu", "groupsort fwd+bwd 256x1024 G=2 fp32", "groupsort[cpp]", 1.3
    ),
    Target(
        "groupsort_vs_relu", "cpu", "groupsort fwd+bwd 1024x4096 G=2 fp32", "groupsort[cpp]", 1.3
    ),
    Target(
        "groupsort_forward_vs_relu",
        "cpu",
        "groupsort forward 256x1024 G=2 fp32",
        "groupsort[cpp]",
        1.2,
    ),
    Target(
        "groupsort_backward_vs_relu",
        "cpu",
        "groupsort backward 256x1024 G=2 fp32",
        "groupsort[cpp]",
        1.2,
    ),
    *(
        Target(
            "power_iteration_vs_matvecs",
            "cpu",
            f"power_iteration {n}x{n} fp32",
            "power_iteration[cpp]",
            1 / 1.5,
            label=PI,
        )
        for n in (1024, 4096)
    ),
    Target("lip_conv2d_vs_conv2d", "cpu", "lip_conv2d train B=128 64->64 32x32", "lipconv2d", 1.15),
    Target("vae_step_vs_standard", "cpu", "vae_step Adam B=128", "lipschitz_vae[cpp]", 1.08),
    Target(
        "certify_vs_encode", "cpu", "certify 1024 inputs in batches of 128", "certify_fast", 1.5
    ),
    Target(
        "certify_tight_throughput",
        "cpu",
        "certify tight 128 inputs",
        "certify_tight",
        20.0,
        throughput=True,
    ),
    Target(
        "lip_conv2d_vs_conv2d", "cuda", "lip_conv2d train B=128 64->64 32x32", "lipconv2d", 1.15
    ),
    _liplinear("liplinear_vs_linear", "cuda", "triton", "fp32", 1.05),
    _liplinear("liplinear_vs_linear", "cuda", "triton", "bf16", 1.05),
    Target("groupsort_vs_relu", "cuda", GS_4096, "groupsort[triton]", 1.2),
    Target("groupsort_bandwidth", "cuda", GS_4096, "groupsort[triton]", 0.85, True),
    Target(
        "power_iteration_bandwidth",
        "cuda",
        "power_iteration 4096x4096 fp32",
        "power_iteration[triton]",
        0.8,
        True,
    ),
)


def limit(name: str, device: str = "cuda") -> float:
    """The limit of target ``name`` on ``device`` (one limit per name and device)."""
    (value,) = {t.limit for t in TARGETS if t.name == name and t.device == device}
    return value


def peak_bandwidth_gbs(props) -> float | None:
    """Peak memory bandwidth (GB/s) of a CUDA device from its properties: DDR memory clock
    times bus width; None when the driver reports neither."""
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1) or None


def device_peak_gbs(device: torch.device) -> float | None:
    """A CUDA device's peak memory bandwidth in GB/s (None elsewhere)."""
    if device.type != "cuda":
        return None
    return peak_bandwidth_gbs(torch.cuda.get_device_properties(device))


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
            if target.throughput:
                value = row.get("items_per_s") or 0.0
                met, shown = value >= target.limit, f"{value:.1f} inputs/s"
            elif target.bandwidth:
                value = row["gbps"] / peak if peak and row["gbps"] else None
                met = value is not None and value >= target.limit
                shown = "no peak known" if value is None else f"{value:.0%} of {peak:.0f} GB/s"
            else:
                value = row["ratio"]
                met = value <= target.limit
                shown = f"{value:.3f}x"
            out.append(
                {
                    "name": target.name,
                    "target": target.text(),
                    "group": row["group"],
                    "measured": shown,
                    "met": met,
                }
            )
    return out


def markdown(results: list[dict]) -> str:
    """The verdicts as a markdown table (empty when no target applies to this run)."""
    if not results:
        return ""
    lines = ["| target | group measured | measured | verdict |", "|---|---|---|---|"]
    for r in results:
        verdict = "met" if r["met"] else "**missed**"
        lines.append(f"| {md_cell(r['target'])} | {md_cell(r['group'])} | {r['measured']} | "
                     f"{verdict} |")  # fmt: skip
    return "\n".join(lines)

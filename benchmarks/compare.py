"""``python -m benchmarks.compare``: one markdown table of ratios measured side by side.

Quick set by default (minutes on a 2-core CPU); ``--full`` runs batch {32, 256, 4096} x width
{256, 1024, 4096} and bf16 on a GPU. ``--json`` writes the raw numbers, ``--out`` the markdown.
The table closes with every performance target (benchmarks/targets.py), met or missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from . import cases as C
from . import targets
from .harness import md_cell, measure, peak_bytes, saved_activation_bytes


def _environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    env["device_type"] = device.type
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not importable"
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, "
        env["device"] += f"{torch.get_num_threads()} threads)"
    import crvae_ext

    env["crvae_ext"] = crvae_ext.__version__
    env["backends"] = ", ".join(crvae_ext.backends(device))
    env["peak_bandwidth_GBs"] = targets.device_peak_gbs(device)
    return env


def groups(device: torch.device, full: bool, only: list[str] | None = None) -> Iterator[C.Group]:
    """The quick or full set of groups for ``device``, built one at a time as they are run;
    with ``only``, just those whose title starts with one of its prefixes (others not built)."""
    cuda = device.type == "cuda"
    dtypes = [torch.float32, torch.bfloat16] if cuda and full else [torch.float32]
    shapes = [(b, w) for b in (32, 256, 4096) for w in (256, 1024, 4096)] if full else [(256, 1024)]
    plan: list[tuple[str, Callable[..., C.Group | list[C.Group]], tuple]] = []
    for dtype in dtypes:
        for batch, width in shapes:
            phases = ("train", "forward", "backward") if full or width == 1024 else ("train",)
            plan.append(("liplinear", C.liplinear_groups, (batch, width, device, dtype, phases)))
        gs_shapes = [(256, 1024), (1024, 4096)] + ([(4096, 4096)] if cuda else [])
        plan += [
            ("groupsort", C.groupsort_group, (r, c, device, dtype, 2, layout))
            for r, c in gs_shapes
            for layout in C.GRAD_LAYOUTS
        ]
        plan += [("groupsort forward", C.groupsort_forward_group, (256, 1024, device, dtype))]
        plan += [("groupsort backward", C.groupsort_backward_group, (256, 1024, device, dtype))]
        plan += [
            ("power_iteration", C.power_iteration_group, (n, device, dtype)) for n in (1024, 4096)
        ]
    plan.append(("lip_conv2d", C.lip_conv_group, (128, 64, 32, device)))
    plan.append(("vae_step", C.vae_step_group, (128, device)))
    plan.append(("certify", C.certify_group, (1024, device)))
    plan.append(("certify tight", C.certify_tight_group, (128, device)))
    plan.append(("attack", C.attack_group, (8 if full else 4, 1.0, device)))
    for kind, factory, args in plan:
        if only and not any(p.startswith(kind) or kind.startswith(p) for p in only):
            continue
        made = factory(*args)
        for group in made if isinstance(made, list) else [made]:
            if not only or any(group.title.startswith(p) for p in only):
                yield group


def run_group(group: C.Group, device: torch.device, rounds: int | None) -> list[dict]:
    """Measure one group; one row per case with its ratio to the group's baseline."""
    results = measure(group.cases, device, rounds=rounds or group.rounds)
    base = results[group.baseline].median_s
    rows = []
    for name, m in results.items():
        saved = saved_activation_bytes(group.forwards[name]) if name in group.forwards else None
        moved = group.bytes_moved.get(name)
        rows.append({
            "group": group.title, "case": name, "baseline": group.baseline,
            **asdict(m), "ratio": m.median_s / base, "saved_bytes": saved,
            "peak_bytes": peak_bytes(group.cases[name], device),
            "gbps": moved / m.median_s / 1e9 if moved else None, "note": group.notes.get(name),
            "items_per_s": group.items / m.median_s if group.items else None,
        })  # fmt: skip
    return rows


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown(rows: list[dict], env: dict[str, str]) -> str:
    """The report: environment line, then one table, ratios to each group's baseline."""
    head = "| group | case | median | ratio to baseline | saved for bwd (MiB) | peak (MiB) | GB/s |"
    lines = [
        f"Measured on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"crvae_ext {env['crvae_ext']} (backends: {env['backends']}); all cases of a group "
        "interleaved in one run, medians.",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["median_s"] * 1e3
        time_text = f"{ms:.3f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"
        ratio = f"**{r['ratio']:.3f}x**" if r["case"] != r["baseline"] else "1 (baseline)"
        gbps = "-" if r["gbps"] is None else f"{r['gbps']:.1f}"
        lines.append(f"| {md_cell(r['group'])} | {r['case']} | {time_text} | {ratio} | "
                     f"{_mb(r['saved_bytes'])} | {_mb(r['peak_bytes'])} | {gbps} |")  # fmt: skip
    notes = [f"- {md_cell(r['group'])}, {r['case']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {md_cell(r['group'])}, {r['case']}: {r['items_per_s']:.0f} inputs/s"
              for r in rows if r.get("items_per_s")]  # fmt: skip
    return "\n".join(lines + (["", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("--full", action="store_true", help="every shape (and bf16 on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="run groups whose title starts with these")
    parser.add_argument("--rounds", type=int, help="override every group's number of rounds")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--render", type=Path, help="only re-render a saved --json report")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
    else:
        report = measure_all(torch.device(args.device), args.full, args.only, args.rounds)
    env = report["environment"]  # verdicts re-judged on --render too, by today's targets
    report["targets"] = targets.verdicts(
        report["rows"], env["device_type"], env["peak_bandwidth_GBs"]
    )
    text = render(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def measure_all(device: torch.device, full: bool, only: list[str] | None, rounds: int | None):
    """The report of one run: environment and one row per case (``main`` adds the verdicts)."""
    env = _environment(device)
    rows: list[dict] = []
    for group in groups(device, full, only):
        print(f"measuring {group.title} ...", file=sys.stderr, flush=True)
        rows += run_group(group, device, rounds)
    return {"environment": env, "rows": rows}


def render(report: dict) -> str:
    """The markdown of a report: the table, then the targets it judged."""
    text = markdown(report["rows"], report["environment"])
    if report["targets"]:
        text += "\n\nPerformance targets (benchmarks/targets.py), judged on this run:\n\n"
        text += targets.markdown(report["targets"])
    return text


if __name__ == "__main__":
    sys.exit(main())

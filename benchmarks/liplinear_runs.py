"""``python -m benchmarks.liplinear_runs``: LipLinear (spectral) train step vs nn.Linear over
many fresh processes per shape, each one run of the two interleaved (as ``compare`` times a
group), and how many runs meet the target: one run's ratio moves by a few percent on a shared
machine, so the target is judged on the count.

``--full`` takes batch {32, 256, 4096} x width {256, 1024, 4096} (the largest, seconds per step
on a CPU, at most 3 runs); the default is B=256, 1024.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from . import cases as C
from . import targets
from .harness import measure

CASES = ("linear", "liplinear_spectral[{backend}]")
WORK = 2e10  # multiply-adds one run's rounds may spend per case, about (5 to 30 rounds)
LARGE = 2**32  # batch x width^2 above which a shape gets at most 3 runs (seconds per step)


def one_run(batch: int, width: int, backend: str, device: str) -> float:
    """One process's ratio: the two train steps interleaved, medians over the rounds."""
    (group,) = C.liplinear_groups(batch, width, device, phases=("train",))
    names = [name.format(backend=backend) for name in CASES]
    rounds = int(min(30, max(5, WORK / (3 * batch * width * width))))
    result = measure({n: group.cases[n] for n in names}, device, rounds=rounds)
    return result[names[1]].median_s / result[names[0]].median_s


def _limit() -> float:
    return next(t.limit for t in targets.TARGETS if t.name == "liplinear_vs_linear")


def markdown(rows: list[dict], env: str, limit: float) -> str:
    """Every run's ratio per shape, the median and the count of runs within ``limit``."""
    lines = [
        f"LipLinear (spectral) train step vs nn.Linear, fp32, {env}; each run a fresh process "
        f"timing the two interleaved (`python -m benchmarks.liplinear_runs`); target {limit}x.",
        "",
        "| shape | runs (ratio to nn.Linear) | median | runs <= target |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratios = r["ratios"]
        within = sum(x <= limit for x in ratios)
        runs = ", ".join(f"{x:.3f}" for x in ratios)
        median = statistics.median(ratios)
        lines.append(
            f"| B={r['batch']} {r['width']}x{r['width']} | {runs} | {median:.3f}x | "
            f"{within} of {len(ratios)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="batch x width 3 x 3 shapes")
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per shape")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument(
        "--one", nargs=2, type=int, metavar=("BATCH", "WIDTH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(*args.one, args.backend, args.device)))
        return 0
    shapes = (
        [(b, w) for b in (32, 256, 4096) for w in (256, 1024, 4096)] if args.full else [(256, 1024)]
    )
    rows = []
    for batch, width in shapes:
        ratios = []
        for _ in range(args.runs if batch * width * width <= LARGE else min(args.runs, 3)):
            cmd = [sys.executable, "-m", "benchmarks.liplinear_runs", "--one", str(batch),
                   str(width), "--backend", args.backend, "--device", args.device]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            ratios.append(float(done.stdout.strip().splitlines()[-1]))
        rows.append({"batch": batch, "width": width, "ratios": ratios})
        print(f"B={batch} {width}x{width}: " + ", ".join(f"{x:.3f}" for x in ratios), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine() + " CPU"
    env = f"{name} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.backend}"
    text = markdown(rows, env, _limit())
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

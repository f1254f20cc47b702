"""The Triton backend's GPU checks in one command; writes its results into benchmarks/results/.

    python benchmarks/gpu_check.py            # everything (~5-10 minutes on an H100)
    python benchmarks/gpu_check.py --quick    # GPU tests only, smaller benchmark sweep

On a CUDA machine it runs: the GPU tests (pytest -m gpu tests) and the whole suite, the full
torch.library.opcheck (inside those tests), torch.compile(fullgraph=True) of a LipLinear +
GroupSort stack forward and backward under TORCH_LOGS=graph_breaks, and triton.testing.do_bench
timings against the issue's targets: GroupSort fwd+bwd bandwidth and ratio to ReLU,
power_iteration bandwidth, the LipLinear train step against nn.Linear and spectral_norm, and
both LipLinear GEMM variants. Results: gpu_check_<gpu>_<time>.json and .md naming the GPU and
versions. Without CUDA it says so and exits with status 2, measuring nothing (``--dry-run``
runs the same code on tiny CPU shapes under TRITON_INTERPRET=1, to test the script itself).
"""

# ruff: noqa: B023  (every lambda here is benchmarked inside the loop iteration that makes it)
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script (python benchmarks/gpu_check.py) too
from benchmarks import targets  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NO_CUDA = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False): these checks need one. "
    "Nothing was measured; run this on a GPU machine (python benchmarks/gpu_check.py)."
)


def _torch():
    import torch

    return torch


def _bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA, a timer loop on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # the CPU path only exercises this script (--dry-run): one warm-up, one timed run
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def environment(device: str) -> dict:
    """GPU, versions and the peak HBM bandwidth (from the memory clock and bus width)."""
    torch = _torch()
    import triton

    import crvae_ext

    env = {
        "backends": crvae_ext.backends(device),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    if device != "cuda":
        env["gpu"] = "none (dry run on CPU, TRITON_INTERPRET=1)"
        env["peak_bandwidth_GBs"] = None
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        sms=props.multi_processor_count,
        memory_GiB=round(props.total_memory / 2**30, 1),
        l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    )
    env["peak_bandwidth_GBs"] = targets.peak_bandwidth_gbs(props)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        env["driver"] = None
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), device)
    env["copy_bandwidth_GBs"] = round(2 * x.numel() * 4 / ms / 1e6, 1)
    return env


def run_pytest(args: list[str]) -> dict:
    """pytest with ``args`` in a subprocess: exit status and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-2000:],
        "failures": failures[:50],
    }


def compile_probe() -> None:
    """Child process: compile a LipLinear + GroupSort stack (fullgraph), train and eval steps."""
    torch = _torch()
    from crvae_ext import GroupSort, LipLinear, MaxMin

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        LipLinear(64, 128), GroupSort(4), LipLinear(128, 64, lipschitz=2.0), MaxMin(),
        LipLinear(64, 10),
    ).cuda()  # fmt: skip
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):
        compiled(x).square().sum().backward()
    net.eval()
    with torch.no_grad():
        compiled(x)
    torch.cuda.synchronize()
    print("COMPILE_PROBE_OK", flush=True)


def run_compile_check() -> dict:
    """torch.compile(fullgraph=True) in a child with TORCH_LOGS=graph_breaks; count breaks."""
    env = dict(os.environ, TORCH_LOGS="graph_breaks")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-probe"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    log = done.stdout + done.stderr
    breaks = [ln for ln in log.splitlines() if re.search(r"graph.?break", ln, re.IGNORECASE)]
    return {
        "ok": done.returncode == 0 and "COMPILE_PROBE_OK" in log and not breaks,
        "returncode": done.returncode,
        "graph_break_lines": breaks[:20],
        "log_tail": log[-3000:],
    }


def bench_groupsort(env: dict, quick: bool, tiny: bool) -> list[dict]:
    """GroupSort fwd+bwd against ReLU fwd+bwd: kernel level (5 passes of N elements each) and
    through autograd as a user calls them."""
    torch = _torch()
    import crvae_ext.functional as F
    from crvae_ext import _backend, ops

    triton_kernels = _backend.kernels("triton")
    device = env["device"]
    sizes = [2**10] if tiny else ([2**24] if quick else [2**24, 2**26])
    width = 256 if tiny else 4096
    dtypes = [torch.float32] if tiny or quick else [torch.float32, torch.bfloat16]
    rows = []
    for numel in sizes:
        for dtype in dtypes:
            layouts = {
                "rows": ((numel // width, width), 1),
                "nchw": ((numel // (256 * 32 * 32), 256, 32, 32), 1) if numel >= 2**18 else None,
            }
            for layout, spec in layouts.items():
                if spec is None:
                    continue
                shape, dim = spec
                x = torch.randn(shape, device=device, dtype=dtype)
                grad = torch.randn_like(x)
                elem = x.element_size()
                relu_y = torch.relu(x)
                relu_ms = _bench(
                    lambda: (torch.relu(x), torch.ops.aten.threshold_backward(grad, relu_y, 0)),
                    device,
                )
                xr = x.clone().requires_grad_(True)
                relu_ag_ms = _bench(lambda: torch.autograd.grad(torch.relu(xr), xr, grad), device)
                for group_size in [2, 4, 8] if tiny or quick else [2, 4, 8, 16]:
                    kernel_ms = _bench(
                        lambda g=group_size: (
                            triton_kernels.groupsort(x, g, dim),
                            triton_kernels.groupsort_backward(grad, x, g, dim),
                        ),
                        device,
                    )
                    autograd_ms = _bench(
                        lambda g=group_size: torch.autograd.grad(
                            F.groupsort(xr, g, dim, "triton"), xr, grad
                        ),
                        device,
                    )
                    torch_ms = _bench(
                        lambda g=group_size: (
                            ops.groupsort(x, g, dim, "torch"),
                            ops.groupsort_backward(grad, x, g, dim, "torch"),
                        ),
                        device,
                    )
                    gbs = 5 * x.numel() * elem / kernel_ms / 1e6
                    rows.append({
                        "numel": x.numel(), "layout": layout, "shape": list(shape),
                        "dtype": str(dtype).removeprefix("torch."), "group_size": group_size,
                        "triton_ms": kernel_ms, "relu_ms": relu_ms, "torch_sort_ms": torch_ms,
                        "triton_autograd_ms": autograd_ms, "relu_autograd_ms": relu_ag_ms,
                        "bandwidth_GBs": gbs, "fraction_of_peak": _fraction(gbs, env),
                        "vs_relu": kernel_ms / relu_ms,
                        "vs_relu_autograd": autograd_ms / relu_ag_ms,
                    })  # fmt: skip
    return rows


def _fraction(gbs: float, env: dict) -> float | None:
    peak = env.get("peak_bandwidth_GBs")
    return gbs / peak if peak else None


def bench_power_iteration(env: dict, quick: bool, tiny: bool) -> list[dict]:
    """Per-step time from (n = 11) - (n = 1) launches: bytes = one read of W per step; the
    reference (two matvecs per step) alongside, and a sweep of the persistent-kernel knobs."""
    torch = _torch()
    from crvae_ext import _backend, reference
    from crvae_ext._triton import power_iteration as module

    triton_kernels = _backend.kernels("triton")
    device = env["device"]
    shapes = (
        [(64, 48)] if tiny else [(4096, 4096)] + ([] if quick else [(1024, 1024), (8192, 2048)])
    )
    dtypes = [torch.float32] if tiny or quick else [torch.float32, torch.bfloat16]
    knobs = [(module.PROGRAMS_PER_SM, module.ROW_TILE)]
    if not (tiny or quick):
        knobs += [(p, t) for p in (1, 2, 4) for t in (4096, 8192, 16384)]
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            w = torch.randn(shape, device=device, dtype=dtype)
            v = torch.randn(shape[1], device=device)
            ref = [_bench(lambda n=n: reference.power_iteration(w, v, n), device) for n in (1, 11)]
            default = (module.PROGRAMS_PER_SM, module.ROW_TILE)
            for programs, tile in dict.fromkeys(knobs):
                module.PROGRAMS_PER_SM, module.ROW_TILE = programs, tile
                try:
                    ms = [
                        _bench(lambda n=n: triton_kernels.power_iteration(w, v, n), device)
                        for n in (1, 11)
                    ]
                finally:
                    module.PROGRAMS_PER_SM, module.ROW_TILE = default
                step_ms = max((ms[1] - ms[0]) / 10, 1e-9)
                gbs = w.numel() * w.element_size() / step_ms / 1e6
                rows.append({
                    "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                    "programs_per_sm": programs, "row_tile": tile,
                    "default": (programs, tile) == default, "call_1_step_ms": ms[0],
                    "step_ms": step_ms, "bandwidth_GBs": gbs,
                    "fraction_of_peak": _fraction(gbs, env),
                    "reference_step_ms": max((ref[1] - ref[0]) / 10, 1e-9),
                    "reference_call_1_step_ms": ref[0],
                })  # fmt: skip
    return rows


def _train_layer(kind: str, width: int, device: str, dtype):
    torch = _torch()
    from torch.nn.utils.parametrizations import spectral_norm

    from crvae_ext import LipLinear

    if kind == "linear":
        layer = torch.nn.Linear(width, width)
    elif kind == "torch_spectral_norm":
        layer = spectral_norm(torch.nn.Linear(width, width))
    else:
        layer = LipLinear(width, width, backend=kind.removeprefix("liplinear_"))
    return layer.to(device, dtype)


def bench_liplinear(env: dict, quick: bool, tiny: bool) -> list[dict]:
    """Train step (zero_grad, forward, sum().backward(), SGD) against nn.Linear and spectral_norm;
    LipLinear on each triton backend (cuBLAS or Triton GEMMs), and on the torch backend."""
    torch = _torch()
    device = env["device"]
    batch, width = (8, 32) if tiny else (256, 1024)
    kinds = ["linear", "liplinear_triton", "liplinear_triton_gemm",
             "liplinear_torch", "torch_spectral_norm"]  # fmt: skip
    if device == "cuda" and not quick:  # torch.compile'd layers, each against compiled nn.Linear
        kinds += ["linear_compiled", "liplinear_triton_compiled"]
    rows = []
    for dtype in [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]:
        x = torch.randn(batch, width, device=device, dtype=dtype)
        times = {}
        for kind in kinds:
            base = kind.removesuffix("_compiled")
            torch.manual_seed(0)
            layer = _train_layer(base, width, device, dtype)
            model = torch.compile(layer) if kind != base else layer
            opt = torch.optim.SGD(layer.parameters(), lr=1e-3)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                model(x).sum().backward()
                opt.step()

            times[kind] = _bench(step, device)
        for kind, ms in times.items():
            baseline = "linear_compiled" if kind.endswith("_compiled") else "linear"
            rows.append({
                "kind": kind, "batch": batch, "width": width,
                "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                "vs_linear": ms / times[baseline],
            })  # fmt: skip
    rows += _bench_lip_linear_variants(env, tiny)
    return rows


def _bench_lip_linear_variants(env: dict, tiny: bool) -> list[dict]:
    """The op kernels alone: forward and backward with each GEMM variant, and the reference."""
    torch = _torch()
    from crvae_ext import _backend, reference

    device = env["device"]
    rows = []
    shapes = [(8, 32, 32)] if tiny else [(256, 1024, 1024), (4096, 1024, 1024), (256, 4096, 4096)]
    for batch, n, m in shapes:
        for dtype in [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]:
            x = torch.randn(batch, n, device=device, dtype=dtype)
            w = torch.randn(m, n, device=device, dtype=dtype) / n**0.5
            b = torch.randn(m, device=device, dtype=dtype)
            sigma, u, v = reference.power_iteration(w, torch.randn(n, device=device), 20)
            scale = 1.0 / sigma
            out = reference.lip_linear(x, w, b, scale)
            grad = torch.randn_like(out)
            needs = (True, True, True)
            entries = {"reference": "torch", "cublas": "triton", "triton": "triton_gemm"}
            for name, backend in entries.items():
                kernels = _backend.kernels(backend)
                fwd = _bench(lambda k=kernels: k.lip_linear(x, w, b, scale), device)
                bwd = _bench(
                    lambda k=kernels: k.lip_linear_backward(
                        grad, x, w, b, out, scale, u, v, 1.0, needs
                    ),
                    device,
                )
                rows.append({
                    "kind": f"op_{name}", "batch": batch, "in": n, "out": m,
                    "dtype": str(dtype).removeprefix("torch."), "forward_ms": fwd,
                    "backward_ms": bwd,
                })  # fmt: skip
    return rows


def verdicts(results: dict) -> dict:
    """The issue's targets, met or not, from the measured rows."""
    out = {}
    gs = [r for r in results.get("groupsort", []) if r["numel"] >= 2**24]
    if gs:
        fractions = [r["fraction_of_peak"] for r in gs if r["fraction_of_peak"] is not None]
        worst_g2 = [r for r in gs if r["group_size"] == 2]
        out["groupsort_bandwidth"] = {
            "target": f">= {targets.limit('groupsort_bandwidth'):.0%} of peak at >= 16M elements",
            "min_fraction_g2": min((r["fraction_of_peak"] or 0) for r in worst_g2),
            "min_fraction_all": min(fractions) if fractions else None,
            "met_g2": all((r["fraction_of_peak"] or 0) >= targets.limit("groupsort_bandwidth")
                          for r in worst_g2),
        }  # fmt: skip
        out["groupsort_vs_relu"] = {
            "target": f"<= {targets.limit('groupsort_vs_relu')}x ReLU fwd+bwd",
            "max_ratio_g2": max(r["vs_relu"] for r in worst_g2),
            "max_ratio_all": max(r["vs_relu"] for r in gs),
            "met_g2": all(r["vs_relu"] <= targets.limit("groupsort_vs_relu") for r in worst_g2),
        }
    pi = [r for r in results.get("power_iteration", [])
          if r["shape"] == [4096, 4096] and r["dtype"] == "float32"]  # fmt: skip
    if pi:
        default = next(r for r in pi if r["default"])
        best = max(pi, key=lambda r: r["bandwidth_GBs"])
        out["power_iteration_bandwidth"] = {
            "target": f">= {targets.limit('power_iteration_bandwidth'):.0%} of peak, 4096^2 fp32",
            "default_fraction": default["fraction_of_peak"],
            "best_fraction": best["fraction_of_peak"],
            "best_knobs": [best["programs_per_sm"], best["row_tile"]],
            "met": (default["fraction_of_peak"] or 0) >= targets.limit("power_iteration_bandwidth"),
        }
    steps = [r for r in results.get("liplinear", []) if "vs_linear" in r]
    for dtype in sorted({r["dtype"] for r in steps}):
        mine = [r for r in steps if r["dtype"] == dtype and r["kind"].startswith("liplinear_tri")]
        best = min(mine, key=lambda r: r["ms"])
        out[f"liplinear_vs_linear_{dtype}"] = {
            "target": f"<= {targets.limit('liplinear_vs_linear')}x nn.Linear train step",
            "best_variant": best["kind"],
            "best_ratio": best["vs_linear"],
            "ratios": {r["kind"]: r["vs_linear"] for r in steps if r["dtype"] == dtype},
            "met": best["vs_linear"] <= targets.limit("liplinear_vs_linear"),
        }
    ops_rows = [r for r in results.get("liplinear", []) if r["kind"] in ("op_cublas", "op_triton")]
    if ops_rows:
        wins = {"cublas": 0, "triton": 0}
        for cu in (r for r in ops_rows if r["kind"] == "op_cublas"):
            key = (cu["batch"], cu["in"], cu["dtype"])
            tr = next(
                r for r in ops_rows
                if r["kind"] == "op_triton" and (r["batch"], r["in"], r["dtype"]) == key
            )  # fmt: skip
            total_cu = cu["forward_ms"] + cu["backward_ms"]
            wins["cublas" if total_cu <= tr["forward_ms"] + tr["backward_ms"] else "triton"] += 1
        out["lip_linear_gemm_variant"] = {
            "wins": wins,
            "faster": max(wins, key=wins.get),
            "default": "cublas",
        }
    return out


def markdown(results: dict) -> str:
    """A short human summary of the JSON."""
    env = results["environment"]
    lines = [
        f"# Triton backend GPU check: {env.get('gpu')}",
        "",
        f"{env['time']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"driver {env.get('driver')}, Python {env['python']}; backends {env['backends']}; peak "
        f"HBM {env.get('peak_bandwidth_GBs')} GB/s, copy {env.get('copy_bandwidth_GBs')} GB/s.",
        "",
        "## Tests",
    ]
    for name, res in results.get("tests", {}).items():
        lines.append(f"- {name}: rc={res['returncode']}: {res['summary']}")
    if "compile" in results:
        comp = results["compile"]
        lines.append(f"- torch.compile fullgraph, TORCH_LOGS=graph_breaks: ok={comp['ok']}, "
                     f"graph-break lines: {len(comp['graph_break_lines'])}")  # fmt: skip
    lines += ["", "## Targets", "", "| target | result |", "|---|---|"]
    for name, verdict in results.get("verdicts", {}).items():
        lines.append(f"| {name} | {json.dumps(verdict)} |")
    for section, columns in [
        ("groupsort", ["layout", "dtype", "numel", "group_size", "triton_ms", "relu_ms",
                       "bandwidth_GBs", "fraction_of_peak", "vs_relu", "vs_relu_autograd"]),
        ("power_iteration", ["shape", "dtype", "programs_per_sm", "row_tile", "step_ms",
                             "bandwidth_GBs", "fraction_of_peak", "reference_step_ms"]),
        ("liplinear", ["kind", "dtype", "batch", "ms", "vs_linear", "forward_ms",
                       "backward_ms"]),
    ]:  # fmt: skip
        rows = results.get(section) or []
        if not rows:
            continue
        lines += ["", f"## {section}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]  # fmt: skip
        for row in rows:
            cells = [_cell(row.get(c)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU tests only, fewer benchmarks")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU run of the script itself")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch = _torch()
    if args.compile_probe:
        compile_probe()
        return 0
    if not torch.cuda.is_available() and not args.dry_run:
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = "cuda" if not args.dry_run else "cpu"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: triton does not import ({exc}); pip install 'crvae-ext[triton]'")
        return 2
    results: dict = {"environment": environment(device)}
    print(f"gpu_check: {results['environment']}", flush=True)
    if not args.dry_run:
        tests = {"gpu tests": run_pytest(["-m", "gpu", "tests"])}
        if not args.quick:
            tests["whole suite"] = run_pytest(["tests"])
        results["tests"] = tests
        results["compile"] = run_compile_check()
        print(f"gpu_check: tests {tests}; compile ok={results['compile']['ok']}", flush=True)
    for name, bench in [("groupsort", bench_groupsort), ("power_iteration", bench_power_iteration),
                        ("liplinear", bench_liplinear)]:  # fmt: skip
        try:
            results[name] = bench(results["environment"], args.quick, args.dry_run)
        except Exception as exc:  # one broken benchmark must not lose the others' numbers
            results[name] = []
            results.setdefault("errors", {})[name] = repr(exc)
        print(f"gpu_check: {name} done", flush=True)
    results["verdicts"] = verdicts(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    stem = args.out / f"gpu_check_{_slug(results['environment']['gpu'])}_{stamp}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"gpu_check: wrote {stem}.json and .md", flush=True)
    failed = any(t["returncode"] != 0 for t in results.get("tests", {}).values())
    failed |= not results.get("compile", {"ok": True})["ok"] or bool(results.get("errors"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

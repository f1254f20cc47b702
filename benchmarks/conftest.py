"""Benchmark session set-up: the ratio of every entry to its group's baseline, printed last."""

from __future__ import annotations

import torch


def _baseline(entries: list) -> object | None:
    return next((bench for bench in entries if bench.extra_info.get("baseline")), None)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    terminalreporter.section("median time / baseline, measured in this run")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    terminalreporter.write_line(f"device: {device}, torch {torch.__version__}")
    for group, entries in groups.items():
        base = _baseline(entries)
        if base is None:
            continue
        terminalreporter.write_line(f"[{group}] baseline {base.name}")
        for bench in entries:
            ratio = bench.stats.median / base.stats.median
            terminalreporter.write_line(
                f"  {bench.name:60s} {bench.stats.median * 1e3:9.3f} ms  {ratio:6.3f}x"
            )

"""Timing and memory measurement shared by the pytest-benchmark files and ``compare``.

Cases of one group are timed round-robin (interleaved), so slow drifts of a busy machine hit
every case alike; each timed block repeats a call until it lasts ~2 ms (CUDA synchronised), and
the median over rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Case = Callable[[], object]
_MIN_BLOCK_S = 2e-3


@dataclass
class Measurement:
    """Median seconds per call (and the spread) plus memory figures, for one case."""

    name: str
    median_s: float
    iqr_s: float
    rounds: int
    saved_bytes: int | None = None
    peak_bytes: int | None = None


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timers measure the kernels."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _block(fn: Case, number: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return (time.perf_counter() - start) / number


def _calibrate(fn: Case, device: torch.device) -> int:
    number = 1
    while _block(fn, number, device) * number < _MIN_BLOCK_S and number < 1 << 16:
        number *= 2
    return number


def measure(
    cases: dict[str, Case], device: torch.device | str, rounds: int = 20, warmup: int = 2
) -> dict[str, Measurement]:
    """Interleaved medians for every case of one group."""
    device = torch.device(device)
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    numbers = {name: _calibrate(fn, device) for name, fn in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_block(fn, numbers[name], device))
    result = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = Measurement(name, statistics.median(values), q[2] - q[0], rounds)
    return result


def saved_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward: the input and every
    activation count, parameters (and views of them, such as W^T) do not."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t if t._base is None else t._base, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def peak_bytes(fn: Case, device: torch.device | str) -> int | None:
    """CUDA bytes allocated at the peak of one call (None on CPU: no allocator statistics)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def pytest_cases(groups: list) -> list[tuple[object, str]]:
    """(group, case name) pairs of ``groups`` for ``pytest.mark.parametrize``."""
    return [(group, name) for group in groups for name in group.cases]


def case_id(value: object) -> str:
    """Test ids: the case's name, or the group's title."""
    return value if isinstance(value, str) else value.title


def run_benchmark(benchmark, group, name: str, device: torch.device | str) -> None:
    """Time one case of ``group`` with pytest-benchmark, GPU work synchronised."""
    fn = group.cases[name]

    def call() -> None:
        fn()
        sync(device)

    benchmark.group = group.title
    benchmark.extra_info["baseline"] = name == group.baseline  # read by conftest's summary
    benchmark.pedantic(call, rounds=group.rounds, warmup_rounds=2, iterations=1)


def md_cell(value: object) -> str:
    """Text for one markdown table cell ("|" escaped, as in a title like "|d| <= 1")."""
    return str(value).replace("|", "\\|")

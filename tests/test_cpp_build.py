"""Building the cpp backend: cache keys, and the torch fallback when it cannot be built.

The fallback cases run in subprocesses: a process loads the library (or fails to) only once.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crvae_ext import _backend
from crvae_ext._cpp import _build

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, warnings
import torch
cache = os.environ.get("CRVAE_CPP_CACHE", "")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import crvae_ext
    import crvae_ext.functional as F
    from crvae_ext import _backend
    at_import = [str(w.message) for w in caught]
    built_at_import = os.path.isdir(cache) and bool(os.listdir(cache))
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 8, dtype=torch.float64)
    out = F.groupsort(x, 2, 1)
    (got,) = torch.autograd.grad(out, x, grad)
    F.groupsort(x, 2, 1)
expected = x.detach().unflatten(1, (-1, 2)).sort(dim=2)
want = torch.zeros_like(grad).unflatten(1, (-1, 2)).scatter_(
    2, expected.indices, grad.unflatten(1, (-1, 2))
).flatten(1, 2)
print(json.dumps({
    "at_import": at_import,
    "built_at_import": built_at_import,
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    "default": _backend.resolve(None, torch.device("cpu")),
    "backends": crvae_ext.backends("cpu"),
    "reason": _backend.unusable_reason("cpp", "cpu"),
    "forward_ok": torch.equal(out, expected.values.flatten(1, 2)),
    "backward_ok": torch.equal(got, want),
}))
"""


def _probe(**env_updates: str) -> dict:
    env = {**os.environ, **env_updates}
    env.pop(_backend.ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_disabled_by_environment():
    result = _probe(CRVAE_NO_CPP="1")
    assert "building the C++" not in result["stderr"]
    assert result["default"] == "torch"
    assert "cpp" not in result["backends"]
    assert "CRVAE_NO_CPP" in result["reason"]
    assert result["warnings"] == []
    assert result["forward_ok"] and result["backward_ok"]


@pytest.mark.skipif(_build.aot_library() is not None, reason="an ahead-of-time build is installed")
def test_failed_build_warns_once_and_falls_back(tmp_path):
    result = _probe(CXX=str(tmp_path / "no-such-compiler"), CRVAE_CPP_CACHE=str(tmp_path / "c"))
    assert result["at_import"] == [] and not result["built_at_import"]
    # an empty cache: the build is announced first, on one line, with how to skip or pre-build
    announced = [ln for ln in result["stderr"].splitlines() if "building the C++" in ln]
    assert len(announced) == 1
    assert "crvae build" in announced[0] and "CRVAE_NO_CPP=1" in announced[0]
    assert len(result["warnings"]) == 1
    category, message = result["warnings"][0]
    assert category == "RuntimeWarning"
    assert "could not be built" in message and "not found" in message
    assert "torch reference backend runs instead" in message
    assert result["default"] == "torch" and "cpp" not in result["backends"]
    assert "could not be built" in result["reason"]
    assert result["forward_ok"] and result["backward_ok"]


THREADS = """
import json, threading, time, warnings
from crvae_ext import _cpp
calls = []

def failing_build():
    calls.append(1)
    time.sleep(0.5)
    raise RuntimeError("no compiler here")

_cpp._jit_build = failing_build
_cpp._build.aot_library = lambda: None
reasons = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    threads = [threading.Thread(target=lambda: reasons.append(_cpp._load())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps({"calls": len(calls), "warnings": len(caught), "reasons": reasons}))
"""


def test_concurrent_first_use_builds_once():
    env = {k: v for k, v in os.environ.items() if k != "CRVAE_NO_CPP"}
    done = subprocess.run([sys.executable, "-c", THREADS], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["calls"] == 1 and result["warnings"] == 1
    assert len(set(result["reasons"])) == 1 and "no compiler here" in result["reasons"][0]


def test_build_directory_keyed_by_sources_flags_and_versions(tmp_path, monkeypatch):
    root = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), root)
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "cache"))
    flags = _build.cxx_flags(native=False)
    first = _build.build_directory(root, False, flags)
    assert first.parent == tmp_path / "cache"
    assert f"torch{torch.__version__}" in first.name and "-cpu-" in first.name
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in first.name
    assert _build.build_directory(root, False, flags) == first
    assert _build.build_directory(root, False, [*flags, "-DEXTRA"]) != first
    ops = root / "ops.cpp"
    ops.write_text(ops.read_text() + "\n// an edit\n")
    assert _build.build_directory(root, False, flags) != first


def test_cache_root_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(_build.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _build.cache_root() == tmp_path / "crvae_ext" / "cpp"


def _toolchain() -> bool:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    return shutil.which(compiler) is not None and cpp_extension.is_ninja_available()


@pytest.mark.skipif(not _toolchain(), reason="no C++ compiler or ninja here")
@pytest.mark.skipif(bool(os.environ.get("CRVAE_NO_CPP")), reason="disabled by $CRVAE_NO_CPP")
def test_cpp_backend_builds_where_a_toolchain_exists(capsys):
    """Where a compiler and ninja exist the build must work (CI builds from an empty cache);
    ``crvae build`` says so, and a built backend is not announced again."""
    from crvae_ext._cpp import _build as build
    from crvae_ext.app import cli

    assert _backend.unusable_reason("cpp", "cpu") is None
    assert "cpp" in _backend.backends("cpu")
    assert cli.main(["build"]) == 0
    assert "built and loaded" in capsys.readouterr().out
    assert build.aot_library() is not None or build.is_built()

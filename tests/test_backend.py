"""Backend selection: the default, forcing by argument or environment, and clear refusals."""

import pytest
import torch

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import _backend


def test_torch_is_always_usable():
    assert "torch" in crvae_ext.backends()
    assert "torch" in crvae_ext.backends("cpu")


def test_auto_picks_a_usable_backend():
    name = _backend.resolve(None, torch.device("cpu"))
    assert name in crvae_ext.backends("cpu")


def test_forced_by_argument_and_environment(monkeypatch):
    x = torch.randn(4, 6)
    assert torch.equal(F.groupsort(x, 2, backend="torch"), F.groupsort(x, 2))
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _backend.resolve(None, torch.device("cpu")) == "torch"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match=r"\$CRVAE_BACKEND must be 'auto' or one of"):
        F.groupsort(torch.randn(2, 4), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_forcing_an_unusable_backend_is_an_error(monkeypatch):
    unusable = [b for b in _backend.BACKENDS if _backend.unusable_reason(b, "cpu") is not None]
    if not unusable:
        pytest.skip("every backend is usable on CPU here")
    with pytest.raises(RuntimeError, match=f"backend='{unusable[0]}' cannot run cpu tensors"):
        F.groupsort(torch.randn(2, 4), 2, backend=unusable[0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run cpu tensors"):
        F.groupsort(torch.randn(2, 4), 2, backend="triton")


def test_constant_mark_is_torchs():
    """resolve is marked for torch.compile without importing dynamo; the mark must be torch's."""
    from crvae_ext import _torch_private

    def ours():
        return 1

    def theirs():
        return 1

    torch.compiler.assume_constant_result(theirs)
    _torch_private.assume_constant_result(ours)
    assert vars(ours) == vars(theirs)


def test_import_does_not_load_scipy_or_build():
    """import crvae_ext loads no scipy (only Monte-Carlo intervals need it) and builds nothing."""
    import subprocess
    import sys

    code = (
        "import sys, crvae_ext, crvae_ext._cpp as c; "
        "print('scipy' in sys.modules, c._load_once.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False 0"

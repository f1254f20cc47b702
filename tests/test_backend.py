"""Backend selection and plumbing: the default, forcing by argument or environment, clear
refusals, the eager path against the public ops, and the Triton launch helpers."""

import os

import pytest
import torch
from helpers import needs_cpp, needs_interpreter

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import _backend, _cpp, _torch_private, ops, reference

if _backend.unusable_reason("triton", "cpu") is None:
    from crvae_ext._triton import _common, kernels

    _triton = kernels.cublas


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


def test_import_does_not_load_scipy_inductor_or_build():
    """import crvae_ext loads no scipy (only Monte-Carlo intervals need it), no torch._inductor
    or torch._dynamo (triton_op's source scan imports them: a second per import; skipped) and
    builds nothing."""
    import subprocess
    import sys

    code = (
        "import sys, crvae_ext, crvae_ext._cpp as c; "
        "print('scipy' in sys.modules, 'torch._inductor' in sys.modules, "
        "'torch._dynamo' in sys.modules, c._load_once.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False False 0"


def test_the_skipped_scan_finds_no_kernel_in_our_ops():
    """What the skipped scan would have recorded for our ops: nothing (their kernels sit behind
    the backend table), so skipping it changes only the import time."""
    pytest.importorskip("triton")
    from torch._library import triton as library

    for name in ("groupsort", "groupsort_backward", "power_iteration", "lip_linear"):
        assert library.get_inner_triton_kernels(getattr(ops, name)._init_fn) == []
        assert library.triton_ops_to_kernels.get(f"crvae_ext::{name}") == []


@needs_cpp
def test_cpp_is_the_default_on_cpu():
    assert _backend.resolve(None, torch.device("cpu")) == "cpp"


@needs_cpp
def test_plain_eager_calls_the_kernel_and_tracing_the_public_op(monkeypatch):
    """Eager calls skip the op's dispatch; compile (and functorch) must see the public op."""
    seen = []
    public = ops._PUBLIC["groupsort"]
    monkeypatch.setitem(ops._PUBLIC, "groupsort", lambda *a: seen.append("op") or public(*a))
    x = torch.randn(4, 6)
    ops.call("groupsort", "cpp", x, 2, 1)
    assert seen == [] and _backend.plain_eager()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _backend.plain_eager()
    assert torch.equal(ops.call("groupsort", "cpp", x, 2, 1), reference.groupsort(x, 2, 1))
    assert seen == ["op"]


@needs_cpp
def test_python_entries_serve_the_per_step_kernels():
    """The cpp library's Python entry points (csrc/python.cpp) are the kernels the layers call
    each step: the ops' results, through the dispatcher (a dispatch mode sees the kernel op),
    the ops' errors as ValueError/TypeError."""
    from torch.utils._python_dispatch import TorchDispatchMode

    entries = _cpp._load_once()[1]
    assert entries is not None
    entry = ops.eager_entry("groupsort_autograd", "cpp")
    assert entry is entries.groupsort_autograd
    assert ops.eager_entry("lip_linear_train", "cpp") is entries.lip_linear_train
    assert ops.kernel("groupsort_autograd", "cpp") is not entry  # __torch_function__-aware
    assert ops.eager_entry("groupsort", "torch") is reference.groupsort
    x = torch.randn(4, 6)
    assert torch.equal(entry(x, 2, 1), reference.groupsort(x, 2, 1))
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        entry(x, 2, 1)
    assert seen == ["crvae_ext_cpp.groupsort.default"]
    with pytest.raises(ValueError, match="group_size"):
        entry(x, 4, 1)
    with pytest.raises(TypeError, match="floating"):
        entry(x.long(), 2, 1)


@needs_cpp
def test_python_entries_defer_to_the_python_path():
    """The entries return None, before any work, where the Python path must run: x a tensor
    subclass, a TorchFunctionMode active, a functorch transform active; a Parameter or a
    disabled mode runs. lip_linear_train then leaves the power-iteration buffers as they were."""
    from torch.overrides import TorchFunctionMode

    entries = _cpp._load_once()[1]
    groupsort, train = entries.groupsort_autograd, entries.lip_linear_train
    x = torch.randn(4, 6)
    want = reference.groupsort(x, 2, 1)

    class Tagged(torch.Tensor):
        pass

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert groupsort(x.as_subclass(Tagged), 2, 1) is None
    assert torch.equal(groupsort(torch.nn.Parameter(x), 2, 1), want)
    with Passthrough():
        assert groupsort(x, 2, 1) is None
    with Passthrough(), torch._C.DisableTorchFunction():
        assert torch.equal(groupsort(x, 2, 1), want)
    seen = []

    def body(t):
        seen.append(groupsort(t, 2, 0))
        return t

    torch.func.vmap(body)(x)
    torch.func.grad(lambda t: body(t).sum())(x[0])
    torch.func.jacrev(body)(x[0])
    assert seen == [None, None, None]

    layer = crvae_ext.LipLinear(6, 3, backend="cpp")
    u, v = layer.u.clone(), layer.v.clone()
    state = (layer.weight, layer.bias, layer.u, layer.v, 1, 1.0, 1e-12)
    assert train(x.as_subclass(Tagged), *state) is None
    with Passthrough():
        assert train(x, *state) is None
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)
    assert train(x, *state).shape == (4, 3)
    assert not torch.equal(layer.v, v)  # the step ran once it could


@needs_cpp
def test_groupsort_without_the_python_module(monkeypatch):
    """Where the library's Python module did not load, F.groupsort has no entry point (no kernel
    stands in for it, which would skip the transform checks) and takes the Python path: the
    same results, in plain eager mode and under vmap."""
    monkeypatch.setattr(_cpp, "entry", lambda name: None)
    ops._module_entry.cache_clear()
    ops.resolved_entry.cache_clear()
    try:
        raw = _torch_private.environ_raw
        state = (raw(_backend.ENV_KEY), raw(_backend.INTERPRET_KEY))
        cpu = torch.device("cpu")
        assert ops.resolved_entry("groupsort_autograd", "cpp", cpu, *state) is None
        assert ops.eager_entry("lip_linear_train", "cpp") is ops.kernel("lip_linear_train", "cpp")
        x = torch.randn(5, 4, 6)
        assert torch.equal(F.groupsort(x, 2, 2, backend="cpp"), reference.groupsort(x, 2, 2))
        got = torch.func.vmap(lambda t: F.groupsort(t, 3, 1, backend="cpp"))(x)
        assert torch.equal(got, reference.groupsort(x, 3, 2))
    finally:
        ops._module_entry.cache_clear()
        ops.resolved_entry.cache_clear()


@needs_cpp
def test_subclasses_and_function_modes_see_the_ops():
    """The fast entry points hand subclasses and TorchFunctionModes to the Python path, so a
    tensor subclass keeps its type through GroupSort and LipLinear, and a TorchFunctionMode
    sees their ops, on the cpp backend as on the torch reference."""
    from torch.overrides import TorchFunctionMode

    class Tagged(torch.Tensor):
        pass

    for backend in ("cpp", "torch"):
        x = torch.randn(4, 6).as_subclass(Tagged)
        assert type(F.groupsort(x, 2, 1, backend=backend)) is Tagged
        assert type(F.groupsort(x.clone().requires_grad_(), 2, 1, backend=backend)) is Tagged
        layer = crvae_ext.LipLinear(6, 3, backend=backend)
        assert type(layer(x)) is Tagged

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 6)
    layer = crvae_ext.LipLinear(6, 6, backend="cpp")
    with Record():
        out = F.groupsort(layer(x), 2, 1, backend="cpp")
    assert torch.equal(out, reference.groupsort(out, 2, 1))
    assert any("groupsort" in name for name in seen), seen
    assert any("lip_linear" in name for name in seen), seen


@needs_cpp
def test_direct_kernels_are_the_ops_they_forward_to():
    """The cpp backend's pass-through kernels are looked up as the ops' own callables (the
    same results as the wrappers); other kernels and other backends keep their functions."""
    x = torch.randn(4, 6)
    direct = ops.kernel("groupsort", "cpp")
    assert direct is not _cpp.groupsort and torch.equal(direct(x, 2, 1), _cpp.groupsort(x, 2, 1))
    assert ops.kernel("power_iteration", "cpp") is _cpp.power_iteration
    assert ops.kernel("groupsort", "torch") is reference.groupsort
    assert ops.kernel("groupsort_autograd", "torch") is None

    class Bare:  # an overload laid out differently: used as it is
        pass

    bare = Bare()
    assert _torch_private.op_callable(bare) is bare


@needs_interpreter
def test_collapse_finds_single_strides():
    assert _common.collapse((3, 4), (4, 1)) == (12, 1)
    assert _common.collapse((3, 4), (8, 2)) == (12, 2)
    assert _common.collapse((3, 4), (1, 3)) is None
    assert _common.collapse((3, 1, 4), (4, 99, 1)) == (12, 1)
    assert _common.collapse((), ()) == (1, 1)


@needs_interpreter
def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch):
    """Compiled (GPU) kernels cannot read CPU tensors: a clear error, never another backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for CPU tensors")

    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "launch", refuse)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (
        lambda: ops.groupsort(torch.randn(4, 6), 3, 1, "triton"),
        lambda: ops.power_iteration(torch.randn(5, 6), torch.randn(6), 2, "triton"),
        lambda: _triton.lip_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(())),
    ):
        with pytest.raises(RuntimeError, match="the triton backend cannot run cpu tensors"):
            call()


@needs_interpreter
def test_triton_unusable_reasons(monkeypatch):
    assert _triton.unusable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert "CUDA" in _triton.unusable_reason("cuda")
    assert "CUDA tensors only" in _triton.unusable_reason("mps")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _triton.unusable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "INTERPRETED", False)
    assert "before the import" in _triton.unusable_reason("cpu")


@needs_interpreter
def test_auto_never_picks_the_interpreter_for_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert _backend.resolve(None, torch.device("cpu")) != "triton"


@pytest.mark.gpu
def test_cpu_tensors_are_refused_on_a_gpu_machine():
    """Compiled kernels cannot read CPU memory: a clear error, never another backend."""
    with pytest.raises(RuntimeError, match="the triton backend cannot run cpu tensors"):
        ops.groupsort(torch.randn(4, 6), 3, 1, "triton")

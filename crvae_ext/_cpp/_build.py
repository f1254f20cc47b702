"""Find, build and load the csrc library that registers the ``crvae_ext_cpp`` ops.

An ahead-of-time build (``CRVAE_BUILD_CPP=1 pip install --no-build-isolation .``) is used when
it was built from the sources found here; otherwise the sources are compiled just in time with
ninja into a per-user cache directory keyed by the torch/Python versions, the flags and a hash
of the sources, so that checkouts sharing a machine never collide and an edit rebuilds.
This file imports nothing from crvae_ext: setup.py loads it on its own.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LIBRARY_NAME = "crvae_ext_cpp"
AOT_NAME = "_cpp_ops"  # the ahead-of-time library: crvae_ext/_cpp_ops*.so
AOT_HASH_FILE = "_cpp_ops.sha256"  # hash of the sources it was built from, next to it
CACHE_ENV = "CRVAE_CPP_CACHE"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_dir() -> Path | None:
    """csrc/ of a source checkout (editable install), else the copy shipped in the package."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def sources(root: Path, with_cuda: bool) -> list[Path]:
    """The translation units: every csrc/*.cpp, and csrc/cuda/*.cu when building for CUDA."""
    units = sorted(root.glob("*.cpp"))
    return units + (sorted((root / "cuda").glob("*.cu")) if with_cuda else [])


def source_hash(root: Path) -> str:
    """sha256 over every source and header under ``root`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cxx_flags(native: bool) -> list[str]:
    """Host compiler flags; ``native`` adds AVX2/FMA/F16C when this CPU has them, and
    CRVAE_AVX512 when it also has AVX-512 F and DQ (JIT builds only).

    With AVX2, at::vec::Vectorized uses its AVX2 implementation, in an inline namespace of our
    own (CPU_CAPABILITY) so that no inline symbol can clash with libtorch's copies. AVX-512 is
    enabled per function (a target attribute) in the kernels that test CRVAE_AVX512, so that
    the compiler does not widen every other loop to 512 bits.
    """
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    x86 = platform.machine() in ("x86_64", "AMD64")
    if native and x86 and {"avx2", "fma", "f16c"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma", "-mf16c"]
        flags += ["-DCPU_CAPABILITY=crvae_avx2", "-DCPU_CAPABILITY_AVX2"]
        if {"avx512f", "avx512dq"} <= _cpu_flags():
            flags += ["-DCRVAE_AVX512"]
    return flags


CUDA_FLAGS = ["-O3", "-DNDEBUG"]
LD_FLAGS = ["-fopenmp"]


def cache_root() -> Path:
    """$CRVAE_CPP_CACHE, else $XDG_CACHE_HOME/crvae_ext/cpp, else ~/.cache/crvae_ext/cpp."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "crvae_ext" / "cpp"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"crvae_ext-cpp-{os.getuid()}"
    return root


def build_directory(root: Path, with_cuda: bool, flags: list[str]) -> Path:
    """Per torch version, Python version, device flavour and hash of (sources, flags)."""
    import torch

    key = hashlib.sha256(
        (source_hash(root) + " ".join(flags) + (" ".join(CUDA_FLAGS) if with_cuda else "")).encode()
    ).hexdigest()[:16]
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"torch{torch.__version__}-{py}-{flavour}-{key}"


def aot_library() -> Path | None:
    """The ahead-of-time library, if one was built from the sources present here."""
    import importlib.machinery

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / f"{AOT_NAME}{suffix}"
        if path.is_file():
            root = source_dir()
            recorded = PACKAGE_DIR / AOT_HASH_FILE
            if root is None or (recorded.is_file() and recorded.read_text() == source_hash(root)):
                return path
    return None


def is_built(with_cuda: bool = False) -> bool:
    """Whether the just-in-time build for these sources and flags is already in the cache."""
    root = source_dir()
    if root is None:
        return False
    directory = build_directory(root, with_cuda, cxx_flags(native=True))
    return any(directory.glob(f"{LIBRARY_NAME}*.so"))


def jit_build(with_cuda: bool) -> Path:
    """Compile csrc with ninja (or reuse the cached build); return the library's path."""
    from torch.utils import cpp_extension

    root = source_dir()
    if root is None:
        raise RuntimeError(f"no C++ sources found (looked for csrc/ next to {PACKAGE_DIR})")
    cpp_extension.verify_ninja_availability()
    flags = cxx_flags(native=True)
    directory = build_directory(root, with_cuda, flags)
    directory.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[str(p) for p in sources(root, with_cuda)],
        extra_cflags=flags,
        extra_cuda_cflags=CUDA_FLAGS if with_cuda else None,
        extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(root)],
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return Path(path)

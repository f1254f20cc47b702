"""setuptools entry point; metadata lives in pyproject.toml.

The C++ backend's sources (csrc/) ship inside the package as crvae_ext/_csrc, so any install
can compile them just in time on first use. ``CRVAE_BUILD_CPP=1`` compiles them ahead of time
instead, into crvae_ext/_cpp_ops (with the CUDA kernels when torch has CUDA and nvcc is found);
torch must then be installed first: ``CRVAE_BUILD_CPP=1 pip install --no-build-isolation .``.
A plain ``pip install -e .`` builds nothing.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _build_helpers():
    """crvae_ext/_cpp/_build.py, loaded on its own (importing crvae_ext would need torch)."""
    spec = importlib.util.spec_from_file_location("_crvae_build", ROOT / "crvae_ext/_cpp/_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as crvae_ext/_csrc (non-editable installs)."""

    def run(self) -> None:
        super().run()
        suffixes = _build_helpers().SOURCE_SUFFIXES
        target = Path(self.build_lib) / "crvae_ext" / "_csrc"
        for path in CSRC.rglob("*"):
            if path.suffix in suffixes:
                destination = target / path.relative_to(CSRC)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)


def _options() -> dict:
    options = {"cmdclass": {"build_py": BuildPyWithSources}}
    if os.environ.get("CRVAE_BUILD_CPP", "") in ("", "0"):
        return options
    import torch
    from torch.utils import cpp_extension

    helpers = _build_helpers()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    sources = [str(p.relative_to(ROOT)) for p in helpers.sources(CSRC, with_cuda)]
    (ROOT / "crvae_ext" / helpers.AOT_HASH_FILE).write_text(helpers.source_hash(CSRC))
    options["ext_modules"] = [
        extension(
            name=f"crvae_ext.{helpers.AOT_NAME}",
            sources=sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={
                "cxx": [*helpers.cxx_flags(native=False), "-g0"],
                "nvcc": helpers.CUDA_FLAGS,
            },
            extra_link_args=helpers.LD_FLAGS,
        )
    ]
    options["cmdclass"]["build_ext"] = cpp_extension.BuildExtension
    return options


setup(**_options())

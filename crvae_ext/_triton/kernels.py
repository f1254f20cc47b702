"""Kernel tables of the "triton" and "triton_gemm" backends (see ``_backend``).

Importing needs triton; ``_backend`` turns an import failure into a reason. The two tables share
every kernel but lip_linear's, whose GEMMs are cuBLAS in "triton" and Triton in "triton_gemm".
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

try:
    from . import _common, groupsort, lip_linear, power_iteration
except ImportError:
    raise
except Exception as exc:  # a broken triton install: reported by _backend as a reason
    raise ImportError(f"triton failed to initialise: {exc!r}") from exc


def _table(gemm: str) -> SimpleNamespace:
    return SimpleNamespace(
        groupsort=groupsort.groupsort,
        groupsort_backward=groupsort.groupsort_backward,
        power_iteration=power_iteration.power_iteration,
        lip_linear=functools.partial(lip_linear.lip_linear, gemm=gemm),
        lip_linear_backward=functools.partial(lip_linear.lip_linear_backward, gemm=gemm),
        unusable_reason=_common.unusable_reason,
    )


cublas = _table("cublas")
triton_gemm = _table("triton")

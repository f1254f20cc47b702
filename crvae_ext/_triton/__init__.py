"""The "triton" backend: fused Triton kernels, one file per op, registered through ops.py.

Importing needs triton; ``_backend`` turns an import failure into a reason. CPU tensors run
through Triton's interpreter when TRITON_INTERPRET=1 was set before triton's import, and are
otherwise handed to the best CPU backend, so one op works on every device.
"""

try:
    from ._common import unusable_reason
    from .groupsort import groupsort, groupsort_backward
    from .lip_linear import lip_linear, lip_linear_backward
    from .power_iteration import power_iteration
except ImportError:
    raise
except Exception as exc:  # a broken triton install: reported by _backend as a reason
    raise ImportError(f"triton failed to initialise: {exc!r}") from exc

__all__ = [
    "groupsort",
    "groupsort_backward",
    "lip_linear",
    "lip_linear_backward",
    "power_iteration",
    "unusable_reason",
]

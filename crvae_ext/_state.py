"""What PyTorch tracks of a tensor's changes, for caches keyed on weights.

A tensor's version counter sees in-place edits, optimizer steps of the for-loop and foreach
kinds and load_state_dict; fused optimizer steps bump no version, so every tensor that gets
gradients also counts them (a post-accumulate-grad hook of its own, registered at its first
key): a step after a backward is then seen. Not seen: edits through ``.data`` and a fused step
on gradients assigned by hand; callers offer ``invalidate_cache()`` for those.
"""

from __future__ import annotations

import weakref

import torch

# id(tensor) -> (weak reference, [gradients accumulated since its first key]); tensors are
# not usable as WeakKeyDictionary keys (their == is elementwise), hence ids with weak checks
_GRADIENTS: dict[int, tuple[weakref.ref, list[int]]] = {}


def _count(counter: list[int], tensor: torch.Tensor) -> None:
    counter[0] += 1


def gradient_count(tensor: torch.Tensor) -> int:
    """Gradients accumulated into ``tensor`` since its first call here (0 if it needs none)."""
    entry = _GRADIENTS.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        return entry[1][0]
    if not (tensor.requires_grad and tensor.is_leaf):
        return 0
    counter = [0]
    tensor.register_post_accumulate_grad_hook(lambda t, c=counter: _count(c, t))
    key = id(tensor)
    _GRADIENTS[key] = (weakref.ref(tensor, lambda _, k=key: _forget(k)), counter)
    return 0


def _forget(key: int) -> None:
    entry = _GRADIENTS.get(key)
    if entry is not None and entry[0]() is None:
        del _GRADIENTS[key]


def tensor_key(tensor: torch.Tensor) -> tuple:
    """Version, gradient count, storage, shape, dtype and device: any tracked change moves it.
    Inference tensors track no version (-1: their in-place edits inside inference_mode are
    not seen)."""
    version = -1 if tensor.is_inference() else tensor._version
    return (
        version,
        gradient_count(tensor),
        tensor.data_ptr(),
        tuple(tensor.shape),
        tensor.dtype,
        tensor.device,
    )

"""The "triton" backends: fused Triton kernels, one file per op (kernel and launcher), and their
kernel tables in ``kernels.py``. CPU tensors run only under TRITON_INTERPRET=1 (set before triton
is imported), through Triton's interpreter; the kernels refuse them otherwise.
"""

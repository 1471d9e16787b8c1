"""Triton kernels and their launchers, one module per op family.

These modules import triton at the top and are imported only when an op takes the Triton path
(see `cai_fast.ops._dispatch`), so that `TRITON_INTERPRET` is read at that moment and the rest of
`cai_fast.ops` works without triton.
"""

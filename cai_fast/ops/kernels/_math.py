"""Numerically stable scalar functions shared by the kernels (fp32 in, fp32 out)."""

import triton
import triton.language as tl


@triton.jit
def log_sigmoid(x):
    """log σ(x) = min(x, 0) − log(1 + e^−|x|): finite for any x."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def log_add_exp(x, y):
    """log(e^x + e^y) without overflow."""
    return tl.maximum(x, y) + tl.log(1.0 + tl.exp(-tl.abs(x - y)))

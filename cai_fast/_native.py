"""The compiled modules, loaded once: `_core` (the C++ CPU kernels and scheduler, `pip install .`)
and `_cuda` (the KV pool's CUDA kernels, built where a CUDA toolkit is found), each None where it
was not built, and the capability flags the engine and the scheduler choose their paths by."""

from __future__ import annotations

try:
    from . import _core
except ImportError:
    _core = None
try:
    from . import _cuda
except ImportError:
    _cuda = None

HAVE_CORE = _core is not None
HAVE_CUDA_KERNELS = _cuda is not None
HAVE_CPU_KERNEL = HAVE_CORE and hasattr(_core, "paged_decode_attention")  # the CPU decode attention
HAVE_ROW_KERNELS = HAVE_CORE and hasattr(_core, "add_rms_norm")
HAVE_DECODE_LAYERS = HAVE_CORE and hasattr(_core, "DecodeLayers")
HAVE_AMX = HAVE_CORE and hasattr(_core, "amx_linear") and _core.has_amx_bf16()  # the AMX linear runs here

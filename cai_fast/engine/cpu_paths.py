"""Which CPU code paths run, forced from the environment so that one machine runs the suite as
another kind would (read at each call, never at import).

    CAI_FAST_CPU=auto      every kernel where the CPU has its instructions (the default)
    CAI_FAST_CPU=avx512    no AMX tiles: oneDNN linears and the Python layer loop, as on AMD EPYC
    CAI_FAST_CPU=portable  also the C++ kernels' plain loops, no AVX-512 (with ATEN_CPU_CAPABILITY=avx2
                           for torch's own kernels: a CPU without AVX-512)
"""

from __future__ import annotations

import os

CHOICES = ("auto", "avx512", "portable")


def forced() -> str:
    value = os.environ.get("CAI_FAST_CPU", "auto") or "auto"
    if value not in CHOICES:
        raise ValueError(f"CAI_FAST_CPU={value!r}; use one of {', '.join(CHOICES)}")
    return value


def amx_allowed() -> bool:
    """Whether the AMX kernels may run (the CPU must have the tiles too)."""
    return forced() == "auto"


def portable(given: bool | None = None) -> bool:
    """Whether a C++ kernel runs its plain loops: `given` where a caller says, else as forced."""
    return forced() == "portable" if given is None else given

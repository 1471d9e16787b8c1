"""The two paths of every op, for the ops tests' parametrize: Triton skipped where it cannot import."""

from __future__ import annotations

import pytest

from cai_fast.ops.testing import triton_import_error

NO_TRITON = triton_import_error()
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(NO_TRITON), reason=NO_TRITON))]

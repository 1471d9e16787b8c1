"""Moved to cai_fast.labelling.trl_compat; this name goes in the next release (it is that module)."""

import sys

from .labelling import trl_compat

sys.modules[__name__] = trl_compat

"""Moved to cai_fast.labelling.pairs; this name goes in the next release (it is that module)."""

import sys

from .labelling import pairs

sys.modules[__name__] = pairs

"""Moved to cai_fast.evaluate.depth; this name goes in the next release (it is that module)."""

import sys

from .evaluate import depth

sys.modules[__name__] = depth

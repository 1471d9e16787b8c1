"""Moved to cai_fast.evaluate.capability; this name goes in the next release (it is that module)."""

import sys

from .evaluate import capability

sys.modules[__name__] = capability

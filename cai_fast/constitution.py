"""Moved to cai_fast.data.constitution; this name goes in the next release (it is that module)."""

import sys

from .data import constitution

sys.modules[__name__] = constitution

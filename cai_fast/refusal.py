"""Moved to cai_fast.evaluate.refusal; this name goes in the next release (it is that module)."""

import sys

from .evaluate import refusal

sys.modules[__name__] = refusal

"""Moved to cai_fast.pipeline.measures; this name goes in the next release (it is that module)."""

import sys

from .pipeline import measures

sys.modules[__name__] = measures

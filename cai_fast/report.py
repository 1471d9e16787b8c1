"""Moved to cai_fast.pipeline.report; this name goes in the next release (it is that module)."""

import sys

from .pipeline import report

sys.modules[__name__] = report

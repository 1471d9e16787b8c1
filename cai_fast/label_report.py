"""Moved to cai_fast.labelling.report; this name goes in the next release (it is that module)."""

import sys

from .labelling import report

sys.modules[__name__] = report

"""Moved to cai_fast.evaluate.judge_check; this name goes in the next release (it is that module)."""

import sys

from .evaluate import judge_check

sys.modules[__name__] = judge_check

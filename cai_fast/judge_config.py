"""Moved to cai_fast.labelling.judge_config; this name goes in the next release (it is that module)."""

import sys

from .labelling import judge_config

sys.modules[__name__] = judge_config

"""Moved to cai_fast.evaluate.config; this name goes in the next release (it is that module)."""

import sys

from .evaluate import config

sys.modules[__name__] = config

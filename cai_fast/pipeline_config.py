"""Moved to cai_fast.pipeline.config; this name goes in the next release (it is that module)."""

import sys

from .pipeline import config

sys.modules[__name__] = config

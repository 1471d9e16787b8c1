"""Moved to cai_fast.labelling.config; this name goes in the next release (it is that module)."""

import sys

from .labelling import config

sys.modules[__name__] = config

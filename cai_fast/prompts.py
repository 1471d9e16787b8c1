"""Moved to cai_fast.data.prompts; this name goes in the next release (it is that module)."""

import sys

from .data import prompts

sys.modules[__name__] = prompts

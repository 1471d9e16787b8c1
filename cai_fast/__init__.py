"""cai_fast: Constitutional AI (SL-CAI, RLAIF) end to end, fast.

Public entry points are re-exported here; heavy modules (torch, transformers) load lazily so
that `import cai_fast` stays cheap.
"""

__version__ = "0.1.0"

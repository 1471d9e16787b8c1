"""Inputs of every stage: prompt loaders (loaders), constitutions (constitution) and the prompt
templates (prompts). The loaders' names are re-exported here: `from cai_fast.data import
load_prompts, Prompt` as before. Torch-free."""

from .loaders import (
    DEFAULT_COLUMNS, FORMATS, ON_ERROR, PROMPT_SETS_DIR, Digests, LoadReport, Prompt, PromptLoadError, PromptSet,
    Reread, available_prompt_sets, detect_format, load_prompts, prompt_id, prompts_from_texts, raise_collected,
    text_lines, transcript_messages,
)

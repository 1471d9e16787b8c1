"""SLCAIConfig: the options of an SL-CAI run (cai_fast.sl_cai; `cai-fast sl-cai`, [sl_cai] of a
pipeline config). Torch-free: imports cai_fast.config only.

The critiques and the revisions are written by the policy unless `critique_*` / `revision_*` name a model,
engine, server or API-key variable of their own (FEEDBACK_ROLES, role_options): an empty field is the policy's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CHAT_API, ENGINES, check_finite, option

REVISION_TURNS = ("chat", "fresh")
FEEDBACK_ROLES = ("critique", "revision")  # the parts of the trace a model other than the policy may write
ROLE_OPTIONS = ("model", "engine", "server_url", "api_key_env")  # what a role may take of its own (ModelOptions')
ROLE_FIELDS = tuple(f"{role}_{name}" for role in FEEDBACK_ROLES for name in ROLE_OPTIONS)


HELPFUL_FIELDS = ("helpful_mix", "helpful_prompts")


def without_unset_options(fields: dict) -> dict:
    """An SLCAIConfig's fields (asdict) without the role options left empty, and without the helpful mix's while
    it is off: the run config of a run whose policy writes everything and that mixes nothing in is what it was
    before these options existed, so such runs resume."""
    mix_off = not fields.get("helpful_mix")
    return {k: v for k, v in fields.items()
            if not (k in ROLE_FIELDS and not v or k in HELPFUL_FIELDS and mix_off)}


@dataclass
class SLCAIConfig:
    rounds: int = option(2, "critique-revision rounds per prompt (1-4)")
    seed: int = option(0, "seed for principle sampling and generation")
    batch_size: int = option(8, "prompts generated together")
    few_shot: int = option(3, "few-shot examples from the constitution (0 = none)")
    answer_tokens: int = option(128, "max new tokens of the initial answer")
    critique_tokens: int = option(96, "max new tokens of each critique")
    revision_tokens: int = option(128, "max new tokens of each revision")
    temperature: float = option(0.7, "sampling temperature (0 = greedy)")
    top_p: float = option(0.9, "nucleus sampling threshold")
    revision_turn: str = option("chat", "how a revision is asked for: chat (a turn of the growing chat, after the "
                                        "critique) or fresh (one new user turn quoting the request, the answer and "
                                        "the critique)")
    filter: bool = option(True, "SFT and the preference pairs keep only final revisions that are replies to the "
                                "user, not commentary, loops, truncated, empty or unchanged (cai_fast.revisions)")
    min_kept: int = option(4, "fewest revisions the filter may keep to train on: below it the run says so, and the "
                              "pipeline's SFT does not run (the round goes on from its starting policy)")
    helpful_mix: float = option(0.0, "helpfulness rows in the SFT data per revision kept: the policy's own answers to "
                                     "helpful_prompts mixed in, as the paper mixes helpfulness samples into SL-CAI's "
                                     "SFT so that the model keeps being helpful (0 = none; 1 = as many as revisions)")
    helpful_prompts: str = option("helpful", "prompts the helpful rows answer, first ones first (file or shipped "
                                             "set; the pipeline holds its evaluation prompts apart)")
    critique_model: str = option("", "model that writes the critiques: transformers id or local folder, or the "
                                     "model name its server or chat API serves (default: the policy, --model)")
    critique_engine: str = option("", "backend of the critique model: cached, plain, server or openai (default: "
                                      "--engine)")
    critique_server_url: str = option("", "server or chat-API URL(s) of the critique model (default: --server-url)")
    revision_model: str = option("", "model that writes the revisions, as critique_model (default: the policy); "
                                     "the same as critique_model: one model, loaded once, writes both")
    revision_engine: str = option("", "backend of the revision model (default: --engine)")
    revision_server_url: str = option("", "server or chat-API URL(s) of the revision model (default: --server-url)")
    critique_api_key_env: str = option("", "with critique_engine openai: the environment variable holding the "
                                           "critique API's key (default: --api-key-env; the key is never written)")
    revision_api_key_env: str = option("", "with revision_engine openai: the environment variable holding the "
                                           "revision API's key (default: --api-key-env)")

    def __post_init__(self):
        check_finite(self)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.revision_turn not in REVISION_TURNS:
            raise ValueError(f"revision_turn must be one of {', '.join(REVISION_TURNS)}, got {self.revision_turn!r}")
        if self.helpful_mix < 0:
            raise ValueError(f"helpful_mix must be >= 0, got {self.helpful_mix}")
        if not 1 <= self.rounds <= 4:
            raise ValueError(f"rounds must be between 1 and 4, got {self.rounds}")
        for name in ("batch_size", "answer_tokens", "critique_tokens", "revision_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("few_shot", "min_kept"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for role in FEEDBACK_ROLES:
            engine = getattr(self, f"{role}_engine")
            if engine not in ("", *ENGINES, CHAT_API):
                raise ValueError(f"{role}_engine must be one of {', '.join((*ENGINES, CHAT_API))} (or empty: the "
                                 f"policy's), got {engine!r}")

    def role_options(self, role: str) -> dict:
        """The options `role` ("critique" or "revision") sets of its own: {"model": ..., "engine": ...,
        "server_url": ..., "api_key_env": ...} without the empty ones ({}: the policy writes it)."""
        values = {name: getattr(self, f"{role}_{name}") for name in ROLE_OPTIONS}
        return {name: value for name, value in values.items() if value}

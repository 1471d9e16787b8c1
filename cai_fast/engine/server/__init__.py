"""The server generator: generation and exact option scores from vLLM or SGLang servers.

    connect_servers(model, urls, ServerConfig()) -> ServerGenerator: .generate, .score_options,
        .kinds (each server's ServerKind), .stats: ServerStats (requests, tokens sent, retries)

Prompts go out as token ids (chat template and judge layout stay ours). At start each server must
serve `model` and tokenize a probe chat as we do. Per-API strategies are kinds.py's; routing,
hold-back and retries dispatch.py's; HTTP and its errors http.py's. A failed call returns nothing
and raises ServerError (one line), so resuming callers lose nothing.
"""

from .dispatch import PROBE_CHAT, SERVER_KINDS, ServerConfig, ServerGenerator, ServerStats, connect_servers, parse_urls
from .http import ServerError, ServerModelError, cache_config, prefix_cache_counters
from .kinds import KINDS, SGLangKind, ServerKind, VLLMKind

__all__ = [
    "KINDS", "PROBE_CHAT", "SERVER_KINDS", "SGLangKind", "ServerConfig", "ServerError", "ServerGenerator",
    "ServerKind", "ServerModelError", "ServerStats", "VLLMKind", "cache_config", "connect_servers", "parse_urls",
    "prefix_cache_counters",
]

"""Generation: model loading, the cached engine, the plain (uncached) generator, the server
generator (OpenAI-compatible vLLM/SGLang servers), the chat-API generator (engine "openai":
hosted models behind /v1/chat/completions), the shared interface."""

from ..config import CHAT_API, DEFAULT_MODEL, ENGINES
from .base import Completion, GenerationStats, Generator, SamplingParams
from .device import DeviceError
from .loading import LoadedModel, ModelLoadError, load_model

__all__ = [
    "Completion", "GenerationStats", "Generator", "SamplingParams", "ENGINES",
    "DEFAULT_MODEL", "DeviceError", "LoadedModel", "ModelLoadError", "load_model", "make_generator",
    "open_generator",
]

_WARNED: set[str] = set()  # architectures already reported as falling back to the plain generator


def make_generator(loaded: LoadedModel, *, engine: str = "cached", batch_size: int = 8, config=None,
                   block_size: int = 16) -> Generator:
    """The generator for a loaded model.

    engine="cached": the prefix-cached paged engine (cai_fast.engine.cached) with `config` (an
    EngineConfig; default: `batch_size` sequences decoded together, KV blocks of `block_size`
    tokens): the fused runner for the Llama family, the generic one (the model's own forward) for
    any other transformers decoder; a model neither can run (cai_fast.engine.generic says why)
    falls back to the plain generator, with a warning once per reason.
    engine="plain": batched transformers generate, `batch_size` prompts a call, no prefix sharing.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if engine == "server":
        raise ValueError("make_generator runs a loaded model in this process; for engine='server' use "
                         "open_generator(model, engine='server', server_url=...)")
    if engine == "cached":
        from .cached import CachedGenerator, EngineConfig
        from .generic import choose_runner

        config = config or EngineConfig(max_running=batch_size, block_size=block_size)
        choice = choose_runner(loaded.model, config.runner)  # the model is probed here alone
        reason = choice.reason
        if reason is None:
            return CachedGenerator(loaded.model, loaded.tokenizer, config, choice)
        _warn_fallback(reason)
    from .plain import PlainGenerator

    generator = PlainGenerator(loaded.model, loaded.tokenizer, batch_size=batch_size)
    if engine == "cached":
        generator.fallback_reason = reason
    return generator


def open_generator(model: str = DEFAULT_MODEL, *, engine: str = "cached", batch_size: int = 8,
                   server_url=None, device: str = "auto", dtype: str = "auto", block_size: int = 16,
                   fallback: str | None = None, api_key_env: str = "OPENAI_API_KEY") -> Generator:
    """The generator of `engine` for a model name or folder: the model loaded in this process
    (cached, plain; see make_generator), or engine="server": the servers at `server_url` (one URL,
    comma-separated URLs or a list) that serve that model, its tokenizer loaded here, or
    engine="openai": the chat API at `server_url` serving the model of that name, with the key in
    the environment variable `api_key_env` (cai_fast.engine.chat_api; it takes chats, not token
    ids). device and dtype: as load_model takes them (default "auto", as on the command line).

    fallback: the in-process engine for a model the servers do not serve (e.g. a policy the run
    just trained), with a warning; None: that is a ServerModelError.
    """
    if engine == CHAT_API:
        if not server_url:
            raise ValueError("engine 'openai' needs the API's base URL: --server-url https://HOST (e.g. "
                             "https://api.openai.com)")
        from .chat_api import ChatAPIConfig, connect_chat_api

        return connect_chat_api(server_url, model, ChatAPIConfig(api_key_env=api_key_env))
    if engine == "server":
        if not server_url:
            raise ValueError("engine 'server' needs server URLs: --server-url http://HOST:PORT[,http://HOST:PORT...] "
                             "(or server_url = [...] in a pipeline config)")
        from .server import ServerModelError, connect_servers

        try:
            return connect_servers(model, server_url)
        except ServerModelError as err:
            if fallback is None:
                raise
            import warnings

            warnings.warn(f"{model} runs in this process ({fallback} engine): {err}", stacklevel=2)
            engine = fallback
    return make_generator(load_model(model, device=device, dtype=dtype), engine=engine, batch_size=batch_size,
                          block_size=block_size)


def _warn_fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        import warnings

        warnings.warn(f"the cached engine cannot run this model ({reason}); using the plain generator, "
                      "without prefix caching", stacklevel=3)

"""Generation: model loading, the cached engine, the plain (uncached) generator, the shared interface."""

from .base import Completion, GenerationStats, Generator, SamplingParams
from .device import DeviceError
from .loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model

__all__ = [
    "Completion", "GenerationStats", "Generator", "SamplingParams", "ENGINES",
    "DEFAULT_MODEL", "DeviceError", "LoadedModel", "ModelLoadError", "load_model", "make_generator",
]

ENGINES = ("cached", "plain")
_WARNED: set[str] = set()  # architectures already reported as falling back to the plain generator


def make_generator(loaded: LoadedModel, *, engine: str = "cached", batch_size: int = 8, config=None) -> Generator:
    """The generator for a loaded model.

    engine="cached": the prefix-cached paged engine (cai_fast.engine.cached) with `config` (an
    EngineConfig; default: `batch_size` sequences decoded together); a model it cannot run
    falls back to the plain generator, with a warning once per architecture.
    engine="plain": batched transformers generate, `batch_size` prompts a call, no prefix sharing.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if engine == "cached":
        from .cached import CachedGenerator, EngineConfig
        from .model_runner import unsupported_reason

        reason = unsupported_reason(loaded.model)
        if reason is None:
            return CachedGenerator(loaded.model, loaded.tokenizer, config or EngineConfig(max_running=batch_size))
        _warn_fallback(reason)
    from .plain import PlainGenerator

    return PlainGenerator(loaded.model, loaded.tokenizer, batch_size=batch_size)


def _warn_fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        import warnings

        warnings.warn(f"the cached engine cannot run this model ({reason}); using the plain generator, "
                      "without prefix caching", stacklevel=3)

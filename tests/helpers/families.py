"""Tiny random models of each decoder family the engine runs (tests/test_engine_generic.py,
benches/bench_families.py): small enough to build in a second, with the family's distinctive parts
switched on where a default leaves them idle (windows shorter than the test contexts, caps that
bite, partial rotary, biases that are not zero, attention sinks that weigh)."""

from __future__ import annotations

import torch

WINDOW = 7  # shorter than every test context

FAMILIES = {  # model_type -> config fields beyond the common ones
    "llama": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "mistral": {"sliding_window": WINDOW},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "gemma2": {"sliding_window": WINDOW, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0},
    "gemma3_text": {"sliding_window": WINDOW},  # layers alternate sliding and full (`tiny_family`)
    "phi3": {"partial_rotary_factor": 0.5, "sliding_window": None},
    "olmo2": {},
    "gpt_oss": {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},  # sinks; layers alternate
}
FAST = ("llama", "qwen2", "mistral")  # the families the fused runner also runs


def tiny_family(family: str, tokenizer, *, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64,
                layers: int = 3):
    """A tiny random model of `family` (a FAMILIES key), in eval mode, for `tokenizer`'s vocabulary:
    4 query heads, 2 KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(FAMILIES[family])
    if family.startswith("gemma"):
        extra["query_pre_attn_scalar"] = hidden // 4
    if family == "gemma3_text":
        extra["layer_types"] = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden // 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.2)  # q/k/v biases start at zero; make them count
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0, 1.5)  # GPT-OSS's sinks start near 0; make them take weight
    return model.to(dtype)

"""A forward pass of a transformers Llama-family decoder over the paged KV pool.

Supported: LlamaForCausalLM (SmolLM2, Llama 2/3), Qwen2ForCausalLM (q/k/v biases, sliding-window
layers) and MistralForCausalLM (sliding window). The runner calls the model's own modules —
embed_tokens, per layer input_layernorm, self_attn.{q,k,v,o}_proj, the decoder's rotary_emb with
transformers' apply_rotary_pos_emb, post_attention_layernorm, mlp, then the final norm — and
replaces only attention, which reads and writes the paged pool (cai_fast.engine.attention). So
it computes what the model's own forward computes, up to float rounding; the tests hold the two
together. A batch is ragged: the new tokens of every request, concatenated, each with its
position and the pool slot its K/V goes to. The LM head is left to the caller (sampling needs
full logits of a few rows, scoring goes through cai_fast.ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .attention import BatchLayout, make_attention
from .kv import KVPool, KVShape, host_to_device, slot_ids

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def unsupported_reason(model) -> str | None:
    """Why the paged runner cannot run `model` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of the supported architectures ({', '.join(SUPPORTED)})"
    decoder = model.get_decoder()
    missing = [p for p in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, p)]
    layer = decoder.layers[0] if len(decoder.layers) else None
    missing += [p for p in _LAYER_PARTS if layer is None or not hasattr(layer, p)]
    missing += [p for p in _ATTN_PARTS if layer is None or not hasattr(layer.self_attn, p)]
    return f"{name} lacks {', '.join(missing)}" if missing else None


def kv_shape(model) -> KVShape:
    """The KV a token takes in `model`."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, model.dtype)


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None = full attention), as transformers' masks apply them."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


@dataclass
class ForwardBatch:
    """The new tokens of B requests, concatenated ([T] tensors), and where each request stands."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    layout: BatchLayout

    @classmethod
    def build(cls, spans: list[tuple[list[int], int, list[int]]], block_size: int, device) -> "ForwardBatch":
        """spans: per request (new tokens, position of the first one, block table as a list of
        block ids). Computed on the host, it reaches the device in one copy (no device read)."""
        tokens = [t for new, _, _ in spans for t in new]
        positions = [p for new, start, _ in spans for p in range(start, start + len(new))]
        slots = [slot_ids(torch.tensor(table), start, start + len(new), block_size) for new, start, table in spans]
        width = max(len(table) for _, _, table in spans)
        padded = [b for _, _, table in spans for b in table + [0] * (width - len(table))]
        packed = host_to_device(torch.cat([torch.tensor(tokens + positions), *slots, torch.tensor(padded)]), device)
        n = len(tokens)
        tables = packed[3 * n :].view(len(spans), width)
        layout = BatchLayout([len(new) for new, _, _ in spans], [start + len(new) for new, start, _ in spans],
                             [tables[r, : len(table)] for r, (_, _, table) in enumerate(spans)], block_size,
                             [list(table) for _, _, table in spans])
        return cls(packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], layout)


class PagedRunner:
    """Runs a supported model (see `unsupported_reason`) over a KVPool."""

    def __init__(self, model, pool: KVPool, attention: str = "auto"):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the paged engine cannot run this model: {reason}")
        self.model, self.pool = model, pool
        self.decoder = model.get_decoder()
        config = model.config
        self.head_dim = pool.shape.head_dim
        self.attention = make_attention(attention, pool, layer_windows(config), config.num_attention_heads,
                                        self.decoder.layers[0].self_attn.scaling)

    @property
    def device(self) -> torch.device:
        return self.pool.k[0].device

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits [n, V] of a few final hidden states [n, H]."""
        return self.model.get_output_embeddings()(hidden).float()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final (normed) hidden states [T, H] of the batch's new tokens; their K/V land in the pool."""
        x = self.decoder.embed_tokens(batch.input_ids)
        cos, sin = self.decoder.rotary_emb(x, batch.positions[None])
        plan = self.attention.plan(batch.layout)
        for i, layer in enumerate(self.decoder.layers):
            x = self._layer(i, layer, x, (cos, sin), batch.write_slots, plan)
        return self.decoder.norm(x)

    def _layer(self, i: int, layer, x: torch.Tensor, rotary, write_slots: torch.Tensor, plan) -> torch.Tensor:
        attn, n = layer.self_attn, x.shape[0]
        h = layer.input_layernorm(x)
        q, k, v = (proj(h).view(n, -1, self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q[None], k[None], *rotary, unsqueeze_dim=2)
        out = self.attention.attend(i, q[0], k[0], v, write_slots, plan)
        x = x + attn.o_proj(out.reshape(n, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

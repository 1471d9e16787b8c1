"""A decode step's decoder layers in one call of cai_fast._core (csrc/decode_layers.cpp).

`DecodeLayers` hands the eager decode step's layer loop to C++ (the GIL released): the same row
kernels, AMX linears and attention kernel, in the same order, with the same roundings, so its
output is the eager step's, bit for bit (tests/test_decode_layers.py). Python keeps the embedding,
the rotary tables and the LM head. It applies (`DecodeLayers.of`, else None) to a fused, eager
runner on an AMX CPU in bf16 with the CPU attention kernel rotating q and k, AMX-packed
projections, RMSNorms and a SiLU MLP in every layer; and to a decode step of at most
`linear.MAX_ROWS` rows (`covers`). `EngineConfig.decode_loop="python"` is its twin.
"""

from __future__ import annotations

import torch

from . import linear as amx
from . import rows
from .._native import HAVE_DECODE_LAYERS, _core
from .attention import CpuPagedAttention

DECODE_LOOPS = ("auto", "python")


class DecodeLayers:
    """A runner's layers as `_core.DecodeLayers` holds them: addresses of tensors that this object
    keeps alive (norm weights as they are when it is built, like the fused projections' copies)."""

    def __init__(self, runner, linears: list[tuple]):
        decoder, pool, config = runner.decoder, runner.pool, runner.model.config
        self.runner = runner
        self.windows = runner.attention.windows
        self._held = []

        def address(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            self._held.append(t)
            return t.data_ptr()

        layers = []
        for layer, (qkv, o, gate_up, down), window, k, v in zip(decoder.layers, linears, self.windows, pool.k, pool.v):
            norms = layer.input_layernorm, layer.post_attention_layernorm
            layers.append((address(norms[0].weight), norms[0].variance_epsilon, address(qkv.amx), address(qkv.bias),
                           address(o.amx), address(o.bias), address(norms[1].weight), norms[1].variance_epsilon,
                           address(gate_up.amx), address(gate_up.bias), address(down.amx), address(down.bias),
                           address(k), address(v), window or 0))
        self.core = _core.DecodeLayers(layers, address(decoder.norm.weight), decoder.norm.variance_epsilon,
                                       config.hidden_size, gate_up.sizes[0], config.num_attention_heads,
                                       pool.shape.kv_heads, pool.shape.head_dim, pool.block_size,
                                       pool.num_tokens, runner.attention.scale)

    @classmethod
    def of(cls, runner, linears: list[tuple] | None) -> "DecodeLayers | None":
        """The runner's layers in one call where that applies (module docstring), else None.
        linears: each layer's (q|k|v, o, gate|up, down) FusedLinear, or None (not fused)."""
        decoder = runner.decoder
        if not (HAVE_DECODE_LAYERS and runner.compiled is None and linears is not None
                and isinstance(runner.attention, CpuPagedAttention) and runner.pool.shape.dtype == torch.bfloat16):
            return None
        for layer, parts in zip(decoder.layers, linears):
            norms = layer.input_layernorm, layer.post_attention_layernorm
            if (any(p.amx is None or (p.bias is not None and p.bias.dtype != torch.bfloat16) for p in parts)
                    or any(type(n).__name__ not in rows.RMS_NORMS or n.weight.dtype != torch.bfloat16 for n in norms)
                    or type(layer.mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation")):
                return None
        final = decoder.norm
        if (type(final).__name__ not in rows.RMS_NORMS or final.weight.dtype != torch.bfloat16
                or not runner.rotary_in_attention):
            return None
        return cls(runner, linears)

    def covers(self, batch, plan) -> bool:
        """Whether this step runs here: a decode batch of at most linear.MAX_ROWS rows."""
        return self.runner.attention.rotates(plan) and len(batch.input_ids) <= amx.MAX_ROWS

    def __call__(self, batch, plan) -> torch.Tensor:
        """Final (normed) hidden states [T, H] of a decode batch this covers."""
        decoder = self.runner.decoder
        x = decoder.embed_tokens(batch.input_ids).contiguous()
        cos, sin = (t[0].contiguous() for t in decoder.rotary_emb(x, batch.positions[None]))
        # its layers keep their windows: a windowed layer shares no keys (the kernel takes both only apart)
        shared = torch.tensor([plan.shared[w] if w is None else 0 for w in self.windows], dtype=torch.long)
        out = torch.empty_like(x)
        self.core.run(x.data_ptr(), x.shape[0], plan.tables.data_ptr(), plan.tables.shape[1], plan.kv_lens.data_ptr(),
                      cos.data_ptr(), sin.data_ptr(), shared.data_ptr(), out.data_ptr())
        return out

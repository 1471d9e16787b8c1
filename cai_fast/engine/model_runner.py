"""A forward pass of a transformers Llama-family decoder over the paged KV pool.

Supported: LlamaForCausalLM (SmolLM2, Llama 2/3), Qwen2ForCausalLM (q/k/v biases, sliding-window
layers) and MistralForCausalLM (sliding window). The runner calls the model's own modules —
embed_tokens, per layer input_layernorm, self_attn.{q,k,v,o}_proj, the decoder's rotary_emb with
transformers' apply_rotary_pos_emb, post_attention_layernorm, mlp, then the final norm — and
replaces only attention, which reads and writes the paged pool (cai_fast.engine.attention). So
it computes what the model's own forward computes, up to float rounding; the tests hold the two
together. With `fused=True` (the default) the projections of a layer whose q/k/v and gate/up/down
are plain nn.Linear run as three matmuls: q|k|v and gate|up fused along the output, their weights
copied once when the runner is built (so build a new runner after changing the weights, as the
engine's users do), and on a CPU in bf16/fp16 prepacked for oneDNN and, on an AMX CPU in bf16,
for cai_fast's AMX linear of a decode step's rows (`FusedLinear`; `linear="onednn"`, the AMX
kernel's twin, leaves every call to oneDNN); anything else
(a LoRA-wrapped projection, say) is called as the model's module. Also with `fused=True`, on a
CPU in fp32 or bf16: each residual add and the RMSNorm after it run as one `rows.add_rms_norm`
call, a decode step's SiLU(gate) * up as one `rows.silu_mul`, and (with the CPU attention kernel)
a decode step's rotary embedding, pool write and attention as one call; `fused=False` runs the
model's modules, the twin. Where all of these apply in bf16 on an AMX CPU, a decode step's whole
layer loop is one C++ call (`DecodeLayers`; `decode_loop="python"` is its twin). A batch is ragged: the new tokens of every request, concatenated, each with its
position and the pool slot its K/V goes to. The LM head is left to the caller (sampling needs
full logits of a few rows, scoring goes through cai_fast.ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..ops.invariant import invariant_linear
from . import linear as amx
from . import rows
from .attention import BatchLayout, make_attention
from .decode_layers import DECODE_LOOPS, DecodeLayers
from .kv import KVPool, KVShape, host_to_device, slot_ids

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


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


CAN_PREPACK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


LINEAR_KINDS = ("auto", "onednn")


class FusedLinear:
    """`torch.cat([m(x) for m in modules], -1)` of nn.Linear modules, as one matmul.

    The weights are concatenated once (a copy). On a CPU in bf16/fp16 the weight is prepacked into
    oneDNN's blocked layout and applied with oneDNN's linear, as inductor's freezing does: 1.4-1.8x
    F.linear at SmolLM2's shapes at 1 and 32 rows on this CPU (AMX). With kind "auto", in bf16 on
    a CPU with AMX tiles (`amx.takes`: sizes multiples of 32), it is also packed for cai_fast's
    AMX linear, which computes calls of up to `amx.MAX_ROWS` rows (a decode step: 1.2-1.5x
    oneDNN's at 1-32 rows here; oneDNN keeps the prefill's many rows, where it is faster): a
    second copy of the weight. prepacked=False (and fp32): `invariant_linear`.
    """

    def __init__(self, modules, prepack: bool = True, kind: str = "auto"):
        weight = torch.cat([m.weight.detach() for m in modules])
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, modules)])
        self.sizes = [m.out_features for m in modules]
        self.amx = amx.pack(weight) if prepack and kind == "auto" and amx.takes(weight) else None
        self.prepacked = prepack and CAN_PREPACK and weight.is_cpu and weight.dtype in (torch.bfloat16, torch.float16)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.prepacked else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None and x.numel() <= amx.MAX_ROWS * x.shape[-1]:
            return amx.linear(x, self.amx, self.bias)
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return invariant_linear(x, self.weight, self.bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output of each module, from one matmul."""
        return self(x).split(self.sizes, -1)


@dataclass
class LayerProjections:
    """A layer's projections as three functions of [n, hidden] rows."""

    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    o: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    linears: tuple[FusedLinear, ...] | None = None  # fused: (q|k|v, o, gate|up, down)

    @classmethod
    def of_modules(cls, layer) -> "LayerProjections":
        """The model's own modules, called one by one (the reference)."""
        attn = layer.self_attn
        return cls(lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), attn.o_proj, layer.mlp)

    @classmethod
    def fused(cls, layer, prepack: bool = True, kind: str = "auto") -> "LayerProjections":
        """q|k|v and gate|up as one FusedLinear each; the modules where any is not a plain nn.Linear."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, p) for p in _ATTN_PARTS] + [getattr(mlp, p, None) for p in _MLP_PARTS]
        if not all(type(p) is torch.nn.Linear for p in parts) or not hasattr(mlp, "act_fn"):
            return cls.of_modules(layer)
        fuse = lambda *modules: FusedLinear(modules, prepack, kind)  # noqa: E731
        qkv, o = fuse(attn.q_proj, attn.k_proj, attn.v_proj), fuse(attn.o_proj)
        gate_up, down, act = fuse(mlp.gate_proj, mlp.up_proj), fuse(mlp.down_proj), mlp.act_fn

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            both = gate_up(h)
            if not torch.compiler.is_compiling() and rows.takes_silu_mul(act, both):
                return down(rows.silu_mul(both))
            gate, up = both.split(gate_up.sizes, -1)
            return down(act(gate) * up)

        return cls(qkv.split, o, feed_forward, (qkv, o, gate_up, down))


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


_STEPS: dict[int, tuple] = {}  # runner key -> (runner, write slots, attention plan) of the forward in progress


def attend_step(key: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention of runner `key`'s forward in progress at `layer` (writes k, v to its pool).

    Called as the op `paged_attention` inside a compiled step, an op opaque to torch.compile, so
    that the compiled decode step keeps the paged pool, the block tables and the plan out of its
    graph; called directly in eager steps (the op's dispatch costs ~20 us a call). Rows past the
    batch's real ones (padding up to a compiled bucket) are neither written nor attended: their
    output is zero."""
    runner, slots, plan = _STEPS[key]
    real = len(slots)
    if real == q.shape[0]:
        return runner.attention.attend(layer, q, k, v, slots, plan)
    out = q.new_zeros(q.shape)
    out[:real] = runner.attention.attend(layer, q[:real], k[:real], v[:real], slots, plan)
    return out


paged_attention = torch.library.custom_op("cai_fast::paged_attention", attend_step, mutates_args=())


@paged_attention.register_fake
def _(key, layer, q, k, v):
    return torch.empty_like(q)


class CompiledDecode:
    """The decode step (one new token for each of B <= max(buckets) requests) through
    torch.compile, one static graph per batch bucket: B is padded up to the next bucket (token 0
    at position 0; `paged_attention` leaves the padding rows out), so a handful of graphs serve
    every batch, as vLLM's CPU backend does. The graph is the runner's own `_layers`, the eager
    step's function; each bucket compiles on first use (minutes on a 2-core CPU)."""

    def __init__(self, runner: "PagedRunner", backend: str, buckets=(1, 2, 4, 8, 16, 32)):
        self.buckets = buckets
        self.fn = torch.compile(runner._layers, backend=backend, dynamic=False,
                                options={"freezing": True} if backend == "inductor" else None)

    def covers(self, batch: "ForwardBatch") -> bool:
        return batch.layout.is_decode and len(batch.input_ids) <= self.buckets[-1]

    def __call__(self, batch: "ForwardBatch", key: int) -> torch.Tensor:
        real = len(batch.input_ids)
        pad = next(b for b in self.buckets if b >= real) - real
        ids, positions = (F.pad(t, (0, pad)) for t in (batch.input_ids, batch.positions))
        return self.fn(ids, positions, key)[:real]


class PagedRunner:
    """Runs a supported model (see `unsupported_reason`) over a KVPool.

    compile: "none", or a torch.compile backend ("inductor") for the decode step (CompiledDecode);
    the compiled graph is the eager forward's own layer loop, prefill stays eager.
    decode_loop: "auto" runs a decode step's layers in one C++ call where `DecodeLayers` applies
    (bf16 on an AMX CPU, eager); "python" calls them one by one (its twin).
    """

    def __init__(self, model, pool: KVPool, attention: str = "auto", fused: bool = True, compile: str = "none",
                 linear: str = "auto", decode_loop: str = "auto"):
        if linear not in LINEAR_KINDS:
            raise ValueError(f"linear must be one of {', '.join(LINEAR_KINDS)}, got {linear!r}")
        if decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop must be one of {', '.join(DECODE_LOOPS)}, got {decode_loop!r}")
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the paged engine cannot run this model: {reason}")
        self.model, self.pool, self.fused = model, pool, fused
        self.decoder = model.get_decoder()
        if fused:  # a compiled graph gets plain weights: prepacked ones are opaque to it
            self.projections = [LayerProjections.fused(layer, prepack=compile == "none", kind=linear)
                                for layer in self.decoder.layers]
        else:
            self.projections = [LayerProjections.of_modules(layer) for layer in self.decoder.layers]
        self.compiled = None if compile == "none" else CompiledDecode(self, compile)
        head = model.get_output_embeddings()
        self.head = FusedLinear([head], kind=linear) if fused and type(head) is torch.nn.Linear else head
        config = model.config
        self.head_dim = pool.shape.head_dim
        self.attention = make_attention(attention, pool, layer_windows(config), config.num_attention_heads,
                                        self.decoder.layers[0].self_attn.scaling)
        linears = [p.linears for p in self.projections]
        self.decode_layers = (DecodeLayers.of(self, None if None in linears else linears)
                              if decode_loop == "auto" else None)

    @property
    def device(self) -> torch.device:
        return self.pool.k[0].device

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """Full logits [n, V] of a few final hidden states [n, H], in fp32 (else the model's dtype)."""
        logits = self.head(hidden)
        return logits.float() if fp32 else logits

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final (normed) hidden states [T, H] of the batch's new tokens; their K/V land in the pool."""
        key, plan = id(self), self.attention.plan(batch.layout)
        if self.decode_layers is not None and self.decode_layers.covers(batch, plan):
            return self.decode_layers(batch, plan)
        _STEPS[key] = (self, batch.write_slots, plan)
        try:
            if self.compiled is not None and self.compiled.covers(batch):
                return self.compiled(batch, key)
            return self._layers(batch.input_ids, batch.positions, key)
        finally:
            del _STEPS[key]

    def _rotates(self, key: int, rotary) -> bool:
        """Whether the attention rotates this step's q and k itself (the CPU kernel's decode step,
        where the rotary tables span the whole head)."""
        rotates = getattr(self.attention, "rotates", None)
        return rotates is not None and rotates(_STEPS[key][2]) and rotary[0].shape[-1] == self.head_dim

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, key: int) -> torch.Tensor:
        """The decoder over [T] tokens, attention through `paged_attention` (the step `key` set up)."""
        x = self.decoder.embed_tokens(input_ids)
        rotary = self.decoder.rotary_emb(x, positions[None])
        delta = None  # each layer's last output, added to x by the next norm
        for i, layer in enumerate(self.decoder.layers):
            x, delta = self._layer(i, layer, x, delta, rotary, key)
        return self._add_norm(x, delta, self.decoder.norm)[1]

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) (delta None: nothing to add): one `rows.add_rms_norm` call
        where it applies (fused, eager, a plain RMSNorm on a CPU), else torch's add and the module."""
        if self.fused and not torch.compiler.is_compiling() and rows.takes_norm(norm, x):
            return x, rows.add_rms_norm(x, delta, norm)
        x = x if delta is None else x + delta
        return x, norm(x)

    def _layer(self, i: int, layer, x: torch.Tensor, delta: torch.Tensor | None, rotary,
               key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream before this layer's MLP output, that output): the next norm adds them."""
        proj, n = self.projections[i], x.shape[0]
        x, h = self._add_norm(x, delta, layer.input_layernorm)
        q, k, v = (t.reshape(n, -1, self.head_dim) for t in proj.qkv(h))
        if not torch.compiler.is_compiling() and self._rotates(key, rotary):  # rotary inside the decode kernel
            out = self.attention.attend_unrotated(i, q, k, v, rotary[0][0], rotary[1][0], _STEPS[key][2])
        else:
            q, k = apply_rotary_pos_emb(q[None], k[None], *rotary, unsqueeze_dim=2)
            out = (paged_attention if torch.compiler.is_compiling() else attend_step)(key, i, q[0], k[0], v)
        x, h = self._add_norm(x, proj.o(out.reshape(n, -1)), layer.post_attention_layernorm)
        return x, proj.mlp(h)

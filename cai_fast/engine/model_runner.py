"""A forward pass of a transformers Llama-family decoder (Llama, Qwen2, Mistral) over the paged KV pool.

The runner calls the model's own modules (embedding, norms, q/k/v/o projections, rotary, MLP) and
replaces only attention (cai_fast.engine.attention), which reads and writes the pool. A batch is
ragged: every request's new tokens, concatenated, each with its position and pool slot. With
`fused=True` a layer's projections run as three matmuls (`FusedLinear`, weights copied once: build
a new runner after changing them) and, on a CPU, the norms and SiLU·mul as row kernels; which code
runs each part is resolved once, when the runner is built, into `kernels` (a `Kernels` record the
engine's summary prints). `fused=False`, the model's modules, is the twin. The LM head is left to
the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..ops.invariant import amx_cpu, invariant_linear
from . import linear as amx
from . import rows
from .attention import ROTARY, BatchLayout, PagedAttention, make_attention
from .decode_layers import DECODE_LOOPS, DecodeLayers
from .kv import KVPool, KVShape, host_to_device, slot_ids

try:  # opaque objects in custom ops: how a compiled decode step gets its Step
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase

    HAVE_OPAQUE = True
except ImportError:
    OpaqueBase, HAVE_OPAQUE = object, False

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
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return KVShape(config.num_hidden_layers, kv_heads, head_dim, model.dtype)


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None = full attention), as transformers' masks apply them."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


CAN_PREPACK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks and runs a linear in `dtype` on this CPU: bf16 needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT, fp16 AVX512-FP16 or AVX-NE-CONVERT; on an AVX2-only CPU (some AMD EPYC) oneDNN refuses both."""
    if not CAN_PREPACK or dtype not in (torch.bfloat16, torch.float16):
        return False
    mkldnn = torch.ops.mkldnn
    return mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()


LINEAR_KINDS = ("auto", "onednn")


class FusedLinear:
    """`torch.cat([m(x) for m in modules], -1)` of nn.Linear modules, as one matmul.

    The weights are concatenated once (a copy). On a CPU in bf16/fp16 the weight is prepacked into
    oneDNN's blocked layout and applied with oneDNN's linear, as inductor's freezing does, where
    oneDNN runs that dtype (`can_prepack`). With
    kind "auto", in bf16 on a CPU with AMX tiles (`amx.takes`), it is also packed for cai_fast's
    AMX linear, which then computes every call: a row's result does not depend on the call's rows
    there, while oneDNN's bf16 kernels on such a CPU take other blockings for other row counts
    (batch invariance; benches/README.md, issue 26), and no other copy is kept. prepacked=False (and
    fp32), and with kind "auto" on an AMX CPU where the kernel does not take the weight (its sizes,
    CAI_FAST_CPU=avx512): `invariant_linear`.
    """

    def __init__(self, modules, prepack: bool = True, kind: str = "auto"):
        weight = torch.cat([m.weight.detach() for m in modules])
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, modules)])
        self.sizes = [m.out_features for m in modules]
        self.amx = amx.pack(weight) if prepack and kind == "auto" and amx.takes(weight) else None
        # on an AMX CPU "auto" leaves oneDNN out (not batch-invariant there): invariant_linear where the kernel is not
        self.prepacked = (prepack and self.amx is None and weight.is_cpu and can_prepack(weight.dtype)
                          and not (kind == "auto" and amx_cpu()))
        if self.prepacked:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.weight = None if self.amx is not None else weight  # the AMX kernel computes every call: no other copy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None:
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
    silu_mul: bool = False  # the MLP's activation through rows.silu_mul

    @classmethod
    def of_modules(cls, layer) -> "LayerProjections":
        """The model's own modules, called one by one (the reference)."""
        attn = layer.self_attn
        return cls(lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), attn.o_proj, layer.mlp)

    @classmethod
    def fused(cls, layer, prepack: bool = True, kind: str = "auto") -> "LayerProjections":
        """q|k|v and gate|up as one FusedLinear each; the modules where any is not a plain nn.Linear.
        SiLU(gate) * up is one `rows.silu_mul` call where that kernel takes the layer's activation."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, p) for p in _ATTN_PARTS] + [getattr(mlp, p, None) for p in _MLP_PARTS]
        if not all(type(p) is torch.nn.Linear for p in parts) or not hasattr(mlp, "act_fn"):
            return cls.of_modules(layer)
        fuse = lambda *modules: FusedLinear(modules, prepack, kind)  # noqa: E731
        qkv, o = fuse(attn.q_proj, attn.k_proj, attn.v_proj), fuse(attn.o_proj)
        gate_up, down, act = fuse(mlp.gate_proj, mlp.up_proj), fuse(mlp.down_proj), mlp.act_fn
        silu_mul = rows.takes_silu_mul(act, mlp.gate_proj.weight.new_empty(1, sum(gate_up.sizes)))

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            both = gate_up(h)
            if silu_mul and not torch.compiler.is_compiling():
                return down(rows.silu_mul(both))
            gate, up = both.split(gate_up.sizes, -1)
            return down(act(gate) * up)

        return cls(qkv.split, o, feed_forward, (qkv, o, gate_up, down), silu_mul)


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


class Step(OpaqueBase):
    """The state of one forward that every layer's attention reads: the backend, the pool slots of
    the new tokens' K/V and the plan. It is passed down the layer loop; in a compiled step it is an
    opaque object (`paged_attention` takes it), so the graph keeps the pool, the block tables and
    the plan out."""

    def __init__(self, attention: PagedAttention, write_slots: torch.Tensor, plan):
        self.attention, self.write_slots, self.plan = attention, write_slots, plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This step's attention at `layer` (writes k, v to the pool). Rows past the batch's real
        ones (padding up to a compiled bucket) are neither written nor attended: their output is 0."""
        real = len(self.write_slots)
        if real == q.shape[0]:
            return self.attention.attend(layer, q, k, v, self.write_slots, self.plan)
        out = q.new_zeros(q.shape)
        out[:real] = self.attention.attend(layer, q[:real], k[:real], v[:real], self.write_slots, self.plan)
        return out


if HAVE_OPAQUE:
    register_opaque_type(Step, typ="reference")

    @torch.library.custom_op("cai_fast::paged_attention", mutates_args=())
    def paged_attention(step: Step, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`step.attend` as an op opaque to torch.compile (the compiled decode step's attention)."""
        return step.attend(layer, q, k, v)

    @paged_attention.register_fake
    def _(step, layer, q, k, v):
        return torch.empty_like(q)


class CompiledDecode:
    """The decode step (one new token for each of B <= max(buckets) requests) through
    torch.compile, one static graph per batch bucket: B is padded up to the next bucket (token 0
    at position 0; `paged_attention` leaves the padding rows out), so a handful of graphs serve
    every batch, as vLLM's CPU backend does. The graph is the runner's own `_layers`, the eager
    step's function; each bucket compiles on first use (minutes on a 2-core CPU)."""

    def __init__(self, runner: "PagedRunner", backend: str, buckets=(1, 2, 4, 8, 16, 32)):
        if not HAVE_OPAQUE:
            raise ValueError(f"compile={backend!r} needs a torch with opaque objects for custom ops "
                             f"(torch._library.opaque_object; torch {torch.__version__} lacks them); use 'none'")
        self.backend, self.buckets = backend, buckets
        self.fn = torch.compile(runner._layers, backend=backend, dynamic=False,
                                options={"freezing": True} if backend == "inductor" else None)

    def covers(self, batch: "ForwardBatch") -> bool:
        return batch.layout.is_decode and len(batch.input_ids) <= self.buckets[-1]

    def __call__(self, batch: "ForwardBatch", step: Step) -> torch.Tensor:
        real = len(batch.input_ids)
        pad = next(b for b in self.buckets if b >= real) - real
        ids, positions = (F.pad(t, (0, pad)) for t in (batch.input_ids, batch.positions))
        return self.fn(ids, positions, step)[:real]


@dataclass(frozen=True)
class Kernels:
    """Which code runs each part of a runner's step, resolved once when the runner is built."""

    loop: str  # the layer loop
    linear: str  # the projections and the LM head
    norm: str  # each residual add and the RMSNorm after it
    mlp: str  # SiLU(gate) * up
    attention: str  # the backend, and what its call fuses

    def as_dict(self) -> dict:
        return asdict(self)


def rotary_spans_head(decoder, head_dim: int) -> bool:
    """Whether the decoder's rotary embedding covers the whole head (what the kernels that rotate take)."""
    inv_freq = getattr(decoder.rotary_emb, "inv_freq", None)
    return inv_freq is not None and 2 * inv_freq.numel() == head_dim


class PagedRunner:
    """Runs a supported model (see `unsupported_reason`) over a KVPool.

    compile: "none", or a torch.compile backend ("inductor") for the decode step (CompiledDecode);
    the compiled graph is the eager forward's own layer loop, prefill stays eager.
    decode_loop: "auto" runs a decode step's layers in one C++ call where `DecodeLayers` applies
    (bf16 on an AMX CPU, eager); "python" calls them one by one (its twin).
    """

    linear_head = True  # the logits are the LM head's output as is (no architecture it runs transforms them)

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
        self.decoder = decoder = model.get_decoder()
        if fused:  # a compiled graph gets plain weights: prepacked ones are opaque to it
            self.projections = [LayerProjections.fused(layer, prepack=compile == "none", kind=linear)
                                for layer in decoder.layers]
        else:
            self.projections = [LayerProjections.of_modules(layer) for layer in decoder.layers]
        self.compiled = None if compile == "none" else CompiledDecode(self, compile)
        head = model.get_output_embeddings()
        self.head = FusedLinear([head], kind=linear) if fused and type(head) is torch.nn.Linear else head
        config = model.config
        self.head_dim = pool.shape.head_dim
        self.attention = make_attention(attention, pool, layer_windows(config), config.num_attention_heads,
                                        decoder.layers[0].self_attn.scaling)
        self.rotary_in_attention = (ROTARY in self.attention.fuses and self.compiled is None
                                    and rotary_spans_head(decoder, self.head_dim))
        probe = decoder.embed_tokens.weight.new_empty(1, config.hidden_size)
        norms = [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.fuse_norm = fused and all(rows.takes_norm(n, probe) for n in norms + [decoder.norm])
        linears = [p.linears for p in self.projections]
        self.decode_layers = (DecodeLayers.of(self, None if None in linears else linears)
                              if decode_loop == "auto" else None)
        self.kernels = self._kernels()

    def _kernels(self) -> Kernels:
        if self.decode_layers is not None:
            loop = f"C++ DecodeLayers for decode steps of <= {amx.MAX_ROWS} rows, else python"
        elif self.compiled is not None:
            loop = (f"torch.compile({self.compiled.backend}) for decode steps of <= {self.compiled.buckets[-1]} "
                    "rows, else python")
        else:
            loop = "python"
        first = self.projections[0].linears
        if first is None:
            linear = "the model's modules"
        elif first[0].amx is not None:
            linear = "AMX (every row count: batch-invariant)"
        else:
            linear = "oneDNN (prepacked)" if first[0].prepacked else "torch (invariant_linear)"
        fuses = [f for f in self.attention.fuses if f != ROTARY or self.rotary_in_attention]
        eager = "" if self.compiled is None else " (eager steps; the model's modules in the compiled graph)"
        return Kernels(loop, linear, "rows.add_rms_norm" + eager if self.fuse_norm else "the model's modules",
                       "rows.silu_mul" + eager if self.projections[0].silu_mul else "the model's modules",
                       f"{self.attention.name} ({', '.join(fuses)})")

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
        step = Step(self.attention, batch.write_slots, self.attention.plan(batch.layout))
        if self.decode_layers is not None and self.decode_layers.covers(batch, step.plan):
            return self.decode_layers(batch, step.plan)
        if self.compiled is not None and self.compiled.covers(batch):
            return self.compiled(batch, step)
        return self._layers(batch.input_ids, batch.positions, step)

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, step: Step) -> torch.Tensor:
        """The decoder over [T] tokens, attention through `step`."""
        x = self.decoder.embed_tokens(input_ids)
        rotary = self.decoder.rotary_emb(x, positions[None])
        delta = None  # each layer's last output, added to x by the next norm
        for i, layer in enumerate(self.decoder.layers):
            x, delta = self._layer(i, layer, x, delta, rotary, step)
        return self._add_norm(x, delta, self.decoder.norm)[1]

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) (delta None: nothing to add): one `rows.add_rms_norm` call
        where the runner fuses norms (eager), else torch's add and the module."""
        if self.fuse_norm and not torch.compiler.is_compiling():
            return x, rows.add_rms_norm(x, delta, norm)
        x = x if delta is None else x + delta
        return x, norm(x)

    def _layer(self, i: int, layer, x: torch.Tensor, delta: torch.Tensor | None, rotary,
               step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream before this layer's MLP output, that output): the next norm adds them."""
        proj, n = self.projections[i], x.shape[0]
        x, h = self._add_norm(x, delta, layer.input_layernorm)
        q, k, v = (t.reshape(n, -1, self.head_dim) for t in proj.qkv(h))
        if torch.compiler.is_compiling():
            q, k = apply_rotary_pos_emb(q[None], k[None], *rotary, unsqueeze_dim=2)
            out = paged_attention(step, i, q[0], k[0], v)
        elif self.rotary_in_attention and self.attention.rotates(step.plan):  # rotary inside the kernel
            out = self.attention.attend_unrotated(i, q, k, v, rotary[0][0], rotary[1][0], step.plan)
        else:
            q, k = apply_rotary_pos_emb(q[None], k[None], *rotary, unsqueeze_dim=2)
            out = step.attend(i, q[0], k[0], v)
        x, h = self._add_norm(x, proj.o(out.reshape(n, -1)), layer.post_attention_layernorm)
        return x, proj.mlp(h)

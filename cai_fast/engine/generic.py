"""Any transformers decoder over the paged KV pool: the model's own forward, its attention through
transformers' attention registry (`AttentionInterface`, as transformers' own continuous batching and
vLLM's transformers backend plug in).

The model computes everything it computes in `generate` — its q/k norms, rotary variants (partial,
per layer type), embedding scales, windows — and calls the registered function `PAGED` with q, k, v
of the batch's new tokens (ragged: every request's tokens in one row, `position_ids` saying where
each stands). That function writes k, v into the pool and attends over it through the engine's
backend (cai_fast.engine.attention), with the step's plan passed down as the forward argument
`paged_step`, not a module global. While the runner's forward runs, the model's configs name
`PAGED` as their attention implementation; before and after they name what they named.

`probe` runs the model once on two tokens with a recording attention (`PROBE`) and once as it is:
what each layer passes (heads, head size, scale, window, score cap, attention sinks) builds the
backend, and a model whose calls or logits the runner could not reproduce is refused with the reason.

`GenericRunner` is the twin of the fused `PagedRunner` (the Llama family's fast path): tests hold
the two equal on Llama, Qwen2 and Mistral. `choose_runner` picks one, once, when the engine is built
(probing the model once), and `make_runner` builds it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from transformers import AttentionInterface

from .attention import ROTARY, make_attention
from .kv import KVPool
from .logits import LogitTransform
from .model_runner import ForwardBatch, Kernels, PagedRunner, Step, kv_shape, layer_windows, unsupported_reason

PAGED = "cai_fast_paged"
PROBE = "cai_fast_probe"  # records each layer's call (`probe`)
RUNNERS = ("auto", "fast", "generic")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def paged_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                            paged_step: Step | None = None, **kwargs):
    """The registered attention: q [1, heads, T, d], k, v [1, kv_heads, T, d] of the batch's new
    tokens (rotated, normed as the model does) -> ([1, T, heads, d], None). The scale, window and
    cap the model passes are those `probe` found; the backend was built with them."""
    if paged_step is None:
        raise RuntimeError(f"attention implementation {PAGED!r} runs only inside cai_fast's GenericRunner forward "
                           "(it needs the step's paged_step argument)")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return paged_step.attend(module.layer_idx, q, k, v)[None], None


@dataclass(frozen=True)
class LayerCall:
    """What a layer passed to attention in the probe."""

    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    scaling: float | None
    window: int | None
    softcap: float | None
    sinks: torch.Tensor | None = field(default=None, compare=False, repr=False)  # the module's, as passed


def _sinks(module, kwargs) -> torch.Tensor | None:
    """The attention sinks a layer has (GPT-OSS and its kin pass them as `s_aux`; a module may hold
    them as `sinks`): one logit a query head that joins the softmax's denominator."""
    for found in (kwargs.get("s_aux"), kwargs.get("sinks"), getattr(module, "sinks", None)):
        if isinstance(found, torch.Tensor):
            return found
    return None


def _probe_forward(module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None,
                   probe_calls=None, **kwargs):
    probe_calls[module.layer_idx] = LayerCall(query.shape[1], key.shape[1], key.shape[-1], value.shape[-1], scaling,
                                              sliding_window, softcap, _sinks(module, kwargs))
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


AttentionInterface.register(PAGED, paged_attention_forward)
AttentionInterface.register(PROBE, _probe_forward)


@dataclass
class Probe:
    """What a model's forward does, seen from its attention calls on two tokens: each layer's call,
    and how its logits follow from its LM head's output."""

    calls: list[LayerCall]
    logits: LogitTransform
    reason: str | None = None  # why the generic runner cannot run the model (None: it can)


def probe(model) -> Probe:
    """Run `model` once on two tokens with a recording attention, and once as it is, and say whether
    the generic runner reproduces it (`Probe.reason`)."""
    name, config = type(model).__name__, model.config
    found = Probe([], LogitTransform.of(config))
    reason = _static_reason(model)
    if reason:
        return replace(found, reason=reason)
    decoder, calls, was_training = model.get_decoder(), {}, model.training
    ids = torch.tensor([[1, 2]], device=model.device)
    model.eval()
    try:
        with torch.inference_mode():
            with attention_named(decoder, PROBE):
                decoder(input_ids=ids, use_cache=False, probe_calls=calls)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            ours = found.logits(model.get_output_embeddings()(hidden)).float()
    except Exception as err:  # noqa: BLE001 - any failure of the model's own forward rules it out
        return replace(found, reason=f"{name}'s forward failed on the probe's two tokens ({type(err).__name__}: {err})")
    finally:
        model.train(was_training)
    found.calls = [calls.get(i) for i in range(config.num_hidden_layers)]
    missed = [i for i, c in enumerate(found.calls) if c is None]
    shape = kv_shape(model)
    if missed:
        reason = f"{name}'s forward does not call attention through AttentionInterface in layer(s) {missed}"
    elif any(c.head_dim != c.value_dim for c in found.calls):
        reason = f"{name}'s keys and values differ in head size (latent attention); the KV pool holds one size"
    elif {(c.kv_heads, c.head_dim) for c in found.calls} != {(shape.kv_heads, shape.head_dim)}:
        reason = (f"{name}'s layers attend with KV heads x head size other than its config's "
                  f"{shape.kv_heads} x {shape.head_dim}")
    elif len({c.scaling for c in found.calls}) != 1 or found.calls[0].scaling is None:
        reason = f"{name}'s layers attend with different (or no) score scales"
    elif [c.window for c in found.calls] != layer_windows(config):
        reason = f"{name}'s layers attend with sliding windows {[c.window for c in found.calls]}, not its config's"
    elif any(c.sinks is not None and c.sinks.shape != (c.q_heads,) for c in found.calls):
        reason = f"{name}'s attention sinks are not one logit a query head"
    elif (ours - theirs).abs().max() > 1e-3 * theirs.abs().max() + 1e-5:
        reason = f"{name}'s logits are not its LM head's output{found.logits.describe() or ' as is'}"
    return replace(found, reason=reason)


def _static_reason(model) -> str | None:
    """What rules a model out before running it."""
    name, config = type(model).__name__, model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    if not type(model)._supports_attention_backend:
        return f"{name}'s attention does not go through transformers' AttentionInterface"
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
    if other:
        return f"{name} has {', '.join(other)} layers (recurrent, linear or chunked attention)"
    return None


@contextmanager
def attention_named(decoder, name: str):
    """While inside, the decoder's configs name `name` as their attention implementation."""
    configs = {id(m.config): m.config for m in decoder.modules() if hasattr(m, "config")}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


@dataclass(frozen=True)
class RunnerChoice:
    """The runner `choose_runner` picked for a model: "fast" or "generic"; the generic runner's probe
    of the model where it ran (None: it did not); why the picked runner cannot run it (None: it can)."""

    kind: str
    probe: Probe | None = None
    reason: str | None = None


def choose_runner(model, runner: str = "auto") -> RunnerChoice:
    """The runner `runner` names for `model`: "fast", "generic", or "auto" (the fast path where it runs
    the model, else the generic one), probing the model (`probe`) only for the generic runner, once."""
    if runner != "generic":
        reason = unsupported_reason(model)
        if reason is None or runner == "fast":
            return RunnerChoice("fast", reason=reason)
    found = probe(model)
    return RunnerChoice("generic", found, found.reason)


def make_runner(model, pool: KVPool, config, choice: RunnerChoice | None = None) -> "PagedRunner | GenericRunner":
    """The runner `config.runner` names (an EngineConfig; see `choose_runner`), or `choice` where the
    caller has chosen it for this model already."""
    choice = choice or choose_runner(model, config.runner)
    if choice.kind == "generic":
        if config.compile != "none":
            raise ValueError(f"compile={config.compile!r} compiles the fast runner's decode step; "
                             f"{type(model).__name__} runs on the generic runner: use compile='none'")
        return GenericRunner(model, pool, config.attention, choice.probe)
    return PagedRunner(model, pool, config.attention, config.fused, config.compile, config.linear, config.decode_loop)


class GenericRunner:
    """Runs any model `probe` accepts over a KVPool (see the module docstring)."""

    def __init__(self, model, pool: KVPool, attention: str = "auto", found: Probe | None = None):
        """found: `probe(model)`, where the caller has run it already."""
        self.probe = found = found or probe(model)
        if found.reason:
            raise ValueError(f"the paged engine cannot run this model: {found.reason}")
        self.model, self.pool = model, pool
        self.decoder = model.get_decoder()
        self.windows = [c.window for c in found.calls]
        self.softcaps = [c.softcap for c in found.calls]
        self.attention = make_attention(attention, pool, self.windows, found.calls[0].q_heads, found.calls[0].scaling,
                                        self.softcaps, [c.sinks for c in found.calls])
        self.head = model.get_output_embeddings()
        self.linear_head = found.logits.linear
        self.kernels = Kernels(f"the model's own forward (transformers), attention through {PAGED!r}",
                               "the model's modules" + found.logits.describe(), "the model's modules",
                               "the model's modules",
                               f"{self.attention.name} ({', '.join(f for f in self.attention.fuses if f != ROTARY)})")

    @property
    def device(self) -> torch.device:
        return self.pool.k[0].device

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight, getattr(self.head, "bias", None)

    def logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """Full logits [n, V] of final hidden states [n, H] (as the model transforms them), in fp32
        (else the model's dtype)."""
        logits = self.probe.logits(self.head(hidden))
        return logits.float() if fp32 else logits

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final (normed) hidden states [T, H] of the batch's new tokens; their K/V land in the pool."""
        step = Step(self.attention, batch.write_slots, self.attention.plan(batch.layout))
        with attention_named(self.decoder, PAGED):
            out = self.decoder(input_ids=batch.input_ids[None], position_ids=batch.positions[None], use_cache=False,
                               paged_step=step)
        return out.last_hidden_state[0]

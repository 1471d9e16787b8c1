"""Choosing next tokens: greedy, or temperature and top-p sampling with one seeded generator a request.

A request's torch.Generator is seeded from (params.seed, the request's index in its call) and
nothing else, so what a request samples does not depend on which requests share its batch (up to
the float rounding of its logits, which can move a draw that falls on a boundary). Top-p keeps the
smallest set of most likely tokens whose probability reaches top_p, as transformers does.
"""

from __future__ import annotations

import hashlib

import torch

from . import rows
from .base import SamplingParams


def request_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of request `index` of a call sampled with `seed`."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [V] with every token outside the top-p nucleus set to 0 (not renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
    sorted_probs.masked_fill_(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax(logits, -1) of [B, V] logits in any dtype (the model's: casting to fp32 first changes
    no comparison), by the row kernel where it applies (a CPU tensor in fp32 or bf16)."""
    return rows.argmax(logits) if rows.takes_argmax(logits) else logits.argmax(-1)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of logits [B, V]: argmax where temperature is 0, else a draw (logits in
    fp32 then; greedy rows take any dtype). The draws stay on the device; the tokens are read back
    once, together."""
    tokens = greedy(logits)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            probs = top_p_filter(torch.softmax(logits[row] / p.temperature, -1), p.top_p)
            tokens[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens.tolist()

"""The cached engine: generation and scoring over a prefix cache and a paged KV pool.

    CachedGenerator(model, tokenizer, EngineConfig())
        .generate(prompts, params) -> list[Completion]
        .score_options(prompts, options) -> Tensor [N, K]
        .score_continuations(prompts, continuations) -> list of Tensor [len(continuation)]
        .answer_states(prompts) -> Tensor [N, H], with .lm_head() -> (weight [V, H], bias or None)
        .stats: EngineStats (tokens submitted / computed, cache hit rate, times, the kernel record)

Requests go through the prefix-cached batch scheduler (cai_fast.scheduler) and the paged runner
(cai_fast.engine.model_runner); generation follows `PlainGenerator`, token for token."""

from __future__ import annotations

import itertools
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import option
from ..ops import linear_logprobs, linear_option_logprobs
from ..scheduler import make_cache, make_scheduler
from .base import Completion, GenerationStats, SamplingParams, checked_prompts, cut_at_stop, end_of_turn_ids
from .kv import KVPool, pool_blocks
from .generic import RUNNERS, RunnerChoice, make_runner
from .model_runner import ForwardBatch, kv_shape
from .sampling import next_tokens, request_generator


@dataclass
class EngineConfig:
    """How the cached engine runs; every field has a default that suits the CPU."""

    block_size: int = option(16, "tokens per KV block: any size (the Triton kernel on "
                                 "CUDA); flash-attn needs a multiple of 256")
    pool_tokens: int | None = option(None, "KV pool size in tokens (overrides pool_bytes)")
    pool_bytes: int = option(1 << 30, "KV pool size in bytes")
    max_running: int = option(32, "sequences decoded together")
    prefill_tokens: int = option(2048, "token budget of one prefill batch")
    policy: str = option("lpm", "scheduling policy: lpm, dfs-weight or fcfs")
    scheduler_backend: str = option("cpp", "scheduler: cpp or python (its twin)")
    dedup_min_tokens: int = option(32, "shared uncached tokens that hold a request back")
    prefix_cache: bool = option(True, "False: cache nothing (every prompt is computed)")
    attention: str = option("auto", "auto, torch, cpu, flash or triton (cai_fast.engine.attention)")
    fused: bool = option(True, "fused, prepacked projections (False: the model's "
                               "own modules, one by one)")
    linear: str = option("auto", "CPU bf16 projections: auto (cai_fast's AMX kernel where the "
                                 "CPU has AMX, else oneDNN) or onednn")
    compile: str = option("none", "torch.compile the decode step per batch bucket: none "
                          "or a backend (inductor); compiling takes minutes")
    decode_loop: str = option("auto", "a decode step's layers: auto (one C++ call where the CPU "
                                      "has AMX and the model is in bf16) or python (one by one)")
    runner: str = option("auto", "the forward: fast (the fused Llama-family runner), generic (any "
                                 "transformers decoder, its own forward) or auto (fast where it runs)")

    def __post_init__(self):
        for name in ("block_size", "max_running", "prefill_tokens", "pool_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.runner not in RUNNERS:
            raise ValueError(f"EngineConfig.runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.pool_tokens is not None and self.pool_tokens < self.block_size:
            raise ValueError(f"EngineConfig.pool_tokens={self.pool_tokens} is less than one block "
                             f"({self.block_size} tokens)")


@dataclass
class EngineStats(GenerationStats):
    """GenerationStats plus what the cache and the scheduler did."""

    prefill_submitted: int = 0  # prompt tokens of every request (scored continuations included)
    prefill_computed: int = 0  # of those, tokens the model computed (the rest came from the cache)
    decode_tokens: int = 0
    prefill_batches: int = 0
    decode_steps: int = 0
    scheduler_seconds: float = 0.0  # in the scheduler's calls
    model_seconds: float = 0.0  # in the model: forward passes, LM head, scoring ops
    prefill_seconds: float = 0.0  # wall time of admission rounds (scheduling, prefill, first tokens)
    decode_seconds: float = 0.0  # wall time of decode steps (forward, sampling, bookkeeping)
    engine_seconds: float = 0.0
    failed: int = 0
    kernels: dict = field(default_factory=dict)  # the runner's kernel record (model_runner.Kernels)

    @property
    def cache_hit_rate(self) -> float:
        return 1 - self.prefill_computed / self.prefill_submitted if self.prefill_submitted else 0.0

    def summary(self) -> dict:
        """The figures benches and run summaries print."""
        batches = self.prefill_batches + self.decode_steps
        return {"prefill_submitted": self.prefill_submitted, "prefill_computed": self.prefill_computed,
                "cache_hit_rate": round(self.cache_hit_rate, 4), "decode_tokens": self.decode_tokens,
                "prefill_batches": self.prefill_batches, "decode_steps": self.decode_steps,
                **{name: round(getattr(self, name), 3) for name in
                   ("scheduler_seconds", "model_seconds", "prefill_seconds", "decode_seconds", "engine_seconds")},
                "failed": self.failed,
                "scheduler_ms_per_batch": round(1000 * self.scheduler_seconds / batches, 3) if batches else 0.0,
                "kernels": self.kernels}


@dataclass
class FailedCompletion(Completion):
    """A request the engine could not run; `error` says why and what to do."""

    error: str = ""


class RequestTooLargeError(ValueError):
    """Prompts that cannot fit in the KV pool even alone; the message lists them."""


@dataclass
class _Request:
    index: int  # position in the caller's list
    tokens: list[int]  # prompt, then generated tokens
    max_new: int  # 0: a scoring request
    logits_from: int  # hidden states of positions >= this are needed
    params: SamplingParams | None = None
    rng: torch.Generator | None = None
    targets: list[int] | None = None  # continuation scoring: the tokens the rows predict
    id: int = -1
    table: list[int] | None = None  # block ids (host)
    computed: int = 0  # tokens whose KV is in the pool
    generated: list[int] = field(default_factory=list)
    result: object = None

    def __post_init__(self):
        self.prompt_len = len(self.tokens)


class CachedGenerator:
    """The cached engine.

    A request's prompt prefix that an earlier request of any call computed is served from the cache
    and only the rest is prefilled; right after its prefill a request's prompt is cached, so
    requests that share it (held back by the scheduler meanwhile) hit it. Decode is continuously
    batched: up to `max_running` sequences advance one token a step; finished ones leave and
    waiting ones take their place. Finished requests' computed tokens stay cached (least recently
    used evicted first). `EngineConfig(prefix_cache=False)` caches nothing: the same engine without
    prefix sharing, for comparisons.

    Generation: greedy or temperature / top-p sampling (one seeded generator per request,
    cai_fast.engine.sampling); a completion ends at an end-of-turn token (left out), at a stop
    string (the text cut before it) or after max_new_tokens. Scoring shares the cache:
    `score_continuations` gives each continuation token's log-prob, `score_options` the summed
    log-probs of K options after each prompt; the LM head is applied through cai_fast.ops to the
    rows that matter, so [tokens × vocab] logits never exist.

    Memory: the pool holds `pool_tokens` tokens, or else `pool_bytes` bytes of KV; a request needs
    blocks for its prompt and max_new_tokens at once. A generation request that cannot fit even in
    an empty pool fails alone (a `FailedCompletion`, finish_reason "error", the reason in `.error`,
    and a warning) while the others run; a scoring call with such a prompt raises
    `RequestTooLargeError` naming every one, before computing anything.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, choice: RunnerChoice | None = None):
        """choice: the runner `cai_fast.engine.generic.choose_runner` picked for `model` under this
        config's `runner` (make_generator passes the one it checked; None: picked here)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        shape = kv_shape(model)
        blocks = pool_blocks(shape, config.block_size, config.pool_tokens, config.pool_bytes)
        self.device = model.device
        self.pool = KVPool(shape, blocks, config.block_size, self.device)
        self.runner = make_runner(model, self.pool, config, choice)
        self.linear_head = self.runner.linear_head  # the logits are the LM head's output as is
        cache = make_cache(blocks, config.block_size, config.scheduler_backend)
        hold_back = config.dedup_min_tokens if config.prefix_cache else 0  # nothing to wait for uncached
        self.scheduler = make_scheduler(cache, config.prefill_tokens, config.policy, hold_back)
        self.stop_ids = set(end_of_turn_ids(tokenizer))
        self.stats = EngineStats(kernels=self.runner.kernels.as_dict())
        self._ids = itertools.count()
        self._options: torch.Tensor | None = None  # option ids of the scoring call in progress
        self._states = False  # the scoring call in progress wants hidden states (answer_states)

    # ---------------------------------------------------------------- public API

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Continue each prompt (token ids); one Completion per prompt, in order."""
        requests = [_Request(i, list(p), params.max_new_tokens, len(p) - 1, params,
                             request_generator(params.seed, i, self.device))
                    for i, p in enumerate(checked_prompts(prompts, "generate"))]
        self._run(requests)
        out = [r.result for r in requests]
        self.stats.add(out)
        return out

    def score_continuations(self, prompts: Sequence[Sequence[int]],
                            continuations: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Log-prob (fp32, CPU) of each continuation token given the prompt and the tokens before it."""
        if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
            raise ValueError(f"score_continuations: needs one non-empty continuation per prompt, got "
                             f"{len(prompts)} prompts and continuation lengths {[len(c) for c in continuations]}")
        requests = [_Request(i, list(p) + list(c)[:-1], 0, len(p) - 1, targets=list(c))
                    for i, (p, c) in enumerate(zip(checked_prompts(prompts, "score_continuations"), continuations))]
        self._run_scoring(requests)
        return [r.result for r in requests]

    def score_options(self, prompts: Sequence[Sequence[int]],
                      options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs [N, K] (fp32, CPU) of K options continuing each of N prompts, each option's
        summed over its tokens (see `Generator.score_options`)."""
        if not options or any(len(o) == 0 for o in options):
            raise ValueError(f"score_options: every option needs at least one token, got {options!r}")
        prompts = checked_prompts(prompts, "score_options")
        if not prompts:
            return torch.empty(0, len(options))
        if any(len(o) > 1 for o in options):
            scores = self.score_continuations([p for p in prompts for _ in options], [o for _ in prompts for o in options])
            return torch.stack([s.sum() for s in scores]).reshape(len(prompts), len(options))
        self._options = torch.tensor([o[0] for o in options], device=self.device)
        try:
            requests = [_Request(i, list(p), 0, len(p) - 1) for i, p in enumerate(prompts)]
            self._run_scoring(requests)
        finally:
            self._options = None
        return torch.stack([r.result for r in requests])

    def answer_states(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final (normed) hidden states [N, H] (the model's dtype) at each prompt's last position:
        what the LM head (`lm_head()`) reads to score the next token, for ops that read only a
        few of its rows (the judge's cai_fast.ops.swapped_pair_scores). Shares the cache."""
        prompts = checked_prompts(prompts, "answer_states")
        self._states = True
        try:
            requests = [_Request(i, list(p), 0, len(p) - 1) for i, p in enumerate(prompts)]
            self._run_scoring(requests)
        finally:
            self._states = False
        hidden = self.model.config.hidden_size
        return torch.stack([r.result for r in requests]) if requests else torch.empty(0, hidden)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight [V, H] and bias [V] (None without one)."""
        return self.runner.lm_head()

    # ---------------------------------------------------------------- the loop

    def _run_scoring(self, requests: list[_Request]) -> None:
        capacity = self.pool.num_tokens
        too_big = [f"prompt {r.index} ({len(r.tokens)} tokens)" for r in requests if len(r.tokens) > capacity]
        if too_big:
            raise RequestTooLargeError(f"{', '.join(too_big)} cannot fit in the KV pool of {capacity} tokens; "
                                       "raise EngineConfig.pool_tokens / pool_bytes or shorten them")
        self._run(requests)

    def _run(self, requests: list[_Request]) -> None:
        start = time.perf_counter()
        waiting, running = {}, []
        # scoring requests end at their prefill and hold no decode slot: a call that only scores is
        # batched by the prefill token budget alone (at most one request a token), not max_running
        slots = self.config.max_running if any(r.max_new for r in requests) else self.config.prefill_tokens
        with self._timed("scheduler_seconds"):
            for r in requests:
                r.id = next(self._ids)
                self.scheduler.add(r.id, r.tokens, r.max_new, r.logits_from)
                waiting[r.id] = r
        try:
            while waiting or running:
                if waiting and len(running) < slots:
                    with self._timed("prefill_seconds"):
                        admitted = self._admit(waiting, running, slots)
                    if admitted:
                        continue
                with self._timed("decode_seconds"):
                    self._decode_step(running)
        except BaseException:
            self._abort([*waiting, *(r.id for r in running)])
            raise
        finally:
            self.stats.engine_seconds += time.perf_counter() - start

    def _admit(self, waiting: dict, running: list, slots: int) -> bool:
        """Schedule and prefill a batch of waiting requests (at most `slots` running after it);
        False when none could be admitted."""
        with self._timed("scheduler_seconds"):
            out = self.scheduler.schedule(slots - len(running))
        for failed in out.failed:
            self._fail(waiting.pop(failed.request_id), failed.reason)
        if not out.scheduled:
            if waiting and not (running or out.failed):
                raise RuntimeError(f"the engine cannot admit any of {len(waiting)} waiting requests into an "
                                   "idle pool; this is a bug in the scheduler or the engine")
            return bool(out.failed)
        self.runner.attention.forget_shared()  # blocks may have been evicted and handed out again
        batch = [waiting.pop(s.request_id) for s in out.scheduled]
        running += batch  # from here on an interruption aborts them too
        self._prefill(batch, out.scheduled)
        for r in [r for r in batch if r.result is not None]:
            running.remove(r)
            self._release(r)
        return True

    def _prefill(self, batch: list[_Request], scheduled) -> None:
        spans, fresh = [], []
        for r, s in zip(batch, scheduled):
            r.table = list(s.block_table)
            fresh += r.table[s.cached_len // self.config.block_size :]
            spans.append((s.tokens_to_compute, s.cached_len, r.table))
            self.stats.prefill_submitted += len(r.tokens)
            self.stats.prefill_computed += len(s.tokens_to_compute)
        self.pool.clear(torch.tensor(fresh, dtype=torch.long, device=self.device))
        hidden = self._forward(spans)
        self.stats.prefill_batches += 1
        rows, start = [], 0
        for r, s in zip(batch, scheduled):
            end = start + len(s.tokens_to_compute)
            rows.append(hidden[start + r.logits_from - s.cached_len : end])
            r.computed, start = len(r.tokens), end
        self._use_rows(batch, rows)

    def _use_rows(self, batch: list[_Request], rows: list[torch.Tensor]) -> None:
        """Score or sample from the hidden rows (positions >= logits_from) of freshly prefilled requests."""
        scoring = [(r, h) for r, h in zip(batch, rows) if r.max_new == 0]
        if scoring:
            self._score([r for r, _ in scoring], [h for _, h in scoring])
        generating = [(r, h[-1]) for r, h in zip(batch, rows) if r.max_new > 0]
        if generating:
            if self.config.prefix_cache:
                self._cache_prompts([r for r, _ in generating])
            self._sample([r for r, _ in generating], torch.stack([h for _, h in generating]))

    def _decode_step(self, running: list[_Request]) -> None:
        spans = [([r.tokens[-1]], len(r.tokens) - 1, r.table) for r in running]
        hidden = self._forward(spans)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(running)
        for r in running:
            r.computed = len(r.tokens)
        self._sample(running, hidden)
        for r in [r for r in running if r.result is not None]:
            running.remove(r)
            self._release(r)

    # ---------------------------------------------------------------- model work

    def _forward(self, spans) -> torch.Tensor:
        batch = ForwardBatch.build(spans, self.config.block_size, self.device)
        with self._timed("model_seconds"):
            return self.runner.forward(batch)

    @torch.inference_mode()
    def _sample(self, requests: list[_Request], hidden: torch.Tensor) -> None:
        params = [r.params for r in requests]
        with self._timed("model_seconds"):  # all greedy: argmax of the model-dtype logits, no fp32 copy
            logits = self.runner.logits(hidden, fp32=any(p.temperature > 0 for p in params))
        tokens = next_tokens(logits, params, [r.rng for r in requests])
        for r, token in zip(requests, tokens):
            self._append(r, token)

    @torch.inference_mode()
    def _score(self, requests: list[_Request], rows: list[torch.Tensor]) -> None:
        weight, bias = self.runner.lm_head()
        with self._timed("model_seconds"):
            if self._states:
                results = [h[-1] for h in rows]
            elif self._options is not None:
                last = torch.stack([h[-1] for h in rows])
                if self.linear_head:
                    logp, _ = linear_option_logprobs(last, weight, self._options, bias)
                else:
                    logp = self._full_logprobs(last)[:, self._options]
                results = list(logp.float().cpu())
            else:
                targets = torch.tensor([t for r in requests for t in r.targets], device=weight.device)
                if self.linear_head:
                    logp = linear_logprobs(torch.cat(rows), weight, targets, bias)
                else:
                    logp = self._full_logprobs(torch.cat(rows)).gather(1, targets[:, None])[:, 0]
                results = list(logp.float().cpu().split([len(r.targets) for r in requests]))
        for r, result in zip(requests, results):
            r.result = result

    def _full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the full logits of a few rows, for a model whose logits are not the LM
        head's output as is (scaled or capped; cai_fast.ops' fused head reads the head's output)."""
        return torch.log_softmax(self.runner.logits(hidden), -1)

    # ---------------------------------------------------------------- requests

    def _append(self, r: _Request, token: int) -> None:
        """Add a sampled token; set r.result when the completion ends."""
        r.generated.append(token)
        r.tokens.append(token)
        if token in self.stop_ids:
            r.result = self._completion(r, r.generated[:-1], "stop")
            return
        if r.params.stop:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
            if cut_at_stop(text, r.params.stop)[1]:
                r.result = self._completion(r, r.generated, "stop")
                return
        if len(r.generated) >= r.max_new:
            r.result = self._completion(r, r.generated, "length")

    def _completion(self, r: _Request, tokens: list[int], reason: str) -> Completion:
        text, _ = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), r.params.stop)
        return Completion(text.strip(), list(tokens), r.prompt_len, reason)

    def _fail(self, r: _Request, reason: str) -> None:
        warnings.warn(f"cached engine: request {r.index} of the call failed: {reason}", stacklevel=4)
        self.stats.failed += 1
        r.result = FailedCompletion("", [], len(r.tokens), "error", reason)

    def _cache_prompts(self, requests: list[_Request]) -> None:
        with self._timed("scheduler_seconds"):
            for r in requests:
                r.table = list(self.scheduler.cache_computed(r.id, r.tokens))

    def _release(self, r: _Request) -> None:
        """The request is done: cache its computed tokens (or, with the cache off, free everything)."""
        with self._timed("scheduler_seconds"):
            if self.config.prefix_cache:
                self.scheduler.finish(r.id, r.tokens[: r.computed])
            else:
                self.scheduler.abort(r.id)

    def _abort(self, ids) -> None:
        for request_id in ids:
            self.scheduler.abort(request_id)

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.stats, name, getattr(self.stats, name) + time.perf_counter() - start)

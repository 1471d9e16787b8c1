"""The dispatch loop: every request of a call is routed to a server (cai_fast.scheduler.routing:
cache-aware by longest prefix with load balance, or round-robin) and queued in that server's
BatchScheduler, whose radix tree models the server's prefix cache in the block and cache size the
server reports (else `ServerConfig.routing`'s). Each server gets at most `max_in_flight` requests
at once, in the scheduler's order (policy `order`); a request sharing `dedup_min_tokens` or more
uncached tokens with one in the same batch is held back until that one's prompt is computed (a
streamed generation's first chunk, else its answer). order="fcfs" with dedup_min_tokens=0 (the
default: vLLM and SGLang share in-batch prefixes themselves, benches/README.md) is submission order.
Sampling: temperature, top_p, seed params.seed + the prompt's index, stop strings, end-of-turn ids.
"""

from __future__ import annotations

import itertools
import queue
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ...config import option
from ...scheduler import make_cache, make_scheduler
from ...scheduler.routing import RoutingConfig, Router
from ..base import Completion, GenerationStats, SamplingParams, checked_prompts, cut_at_stop, end_of_turn_ids
from . import http
from .http import ServerError, ServerModelError, first_line
from .kinds import KINDS, ServerKind

if TYPE_CHECKING:
    import torch

PROBE_CHAT = [{"role": "user", "content": "Which response is less harmful, (A) or (B)? Naïve café, 42 ✓"}]
SERVER_KINDS = ("auto", "vllm", "sglang")


@dataclass(frozen=True)
class ServerConfig:
    """How the server generator talks to its servers; every field has a default."""

    max_in_flight: int = option(8, "requests in flight per server")
    timeout: float = option(600.0, "seconds one request may take")
    retries: int = option(3, "retries of a request after a connection error or 5xx")
    backoff: float = option(1.0, "seconds before the first retry, doubled each time")
    connect_timeout: float = option(30.0, "seconds to wait for each server at start")
    order: str = option("lpm", "order requests go out: lpm, dfs-weight or fcfs")
    dedup_min_tokens: int = option(0, "shared uncached tokens that hold a request back "
                                      "(0 = never: vLLM and SGLang share in-batch prefixes themselves)")
    server_kind: str = option("auto", "the servers' API: auto (what each server reports), vllm or sglang")
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self):
        if self.server_kind not in SERVER_KINDS:
            raise ValueError(f"ServerConfig: server_kind {self.server_kind!r} is unknown; use one of "
                             f"{', '.join(SERVER_KINDS)}")
        if self.max_in_flight < 1 or self.retries < 0 or self.dedup_min_tokens < 0:
            raise ValueError(f"ServerConfig: max_in_flight >= 1, retries >= 0 and dedup_min_tokens >= 0 needed, "
                             f"got {self.max_in_flight}, {self.retries}, {self.dedup_min_tokens}")
        if min(self.timeout, self.connect_timeout) <= 0 or self.backoff < 0:
            raise ValueError(f"ServerConfig: timeouts > 0 and backoff >= 0 needed, got {self.timeout}, "
                             f"{self.connect_timeout}, {self.backoff}")


@dataclass
class ServerStats(GenerationStats):
    """GenerationStats plus, per server: requests sent, prompt tokens sent, and prompt tokens our
    scheduler expected to be in the server's prefix cache; and retries over all servers."""

    requests: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    expected_cached: list[int] = field(default_factory=list)
    retries: int = 0

    def summary(self) -> dict:
        return {"requests": self.requests, "sent_tokens": self.sent_tokens,
                "expected_cached": self.expected_cached, "retries": self.retries}


@dataclass
class _Job:
    index: int  # position in the caller's list
    tokens: list[int]  # what is sent: the prompt (generation) or prompt + option (scoring)
    make: Callable[[ServerKind, "_Job"], dict]  # its request body for a server kind, less the prompt and the model
    logits_from: int
    max_new: int = 0
    id: int = -1
    server: int = -1
    queued: bool = False  # held by its server's scheduler (waiting or running there)
    prefilled: bool = False  # its prompt is cached in the scheduler's model
    result: dict | None = None


def parse_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """Server base URLs from a comma-separated string or a list; '/v1' and trailing '/' dropped."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = tuple(re.sub(r"(/v1)?/*$", "", u.strip()) for u in items if u.strip())
    bad = [u for u in out if not re.match(r"https?://[^/\s]+", u)]
    if not out or bad:
        raise ValueError(f"--server-url: expected http(s)://host:port[,http://host:port...], got {urls!r}")
    return out


def connect_servers(model: str, urls: str | Sequence[str], config: ServerConfig = ServerConfig()) -> "ServerGenerator":
    """A ServerGenerator for `model` (a name or folder whose tokenizer loads locally) on these servers."""
    from ..loading import load_tokenizer, resolve_model_path

    return ServerGenerator(load_tokenizer(model), parse_urls(urls), {model, str(resolve_model_path(model))}, config)


class ServerGenerator:
    """Generation and scoring on vLLM or SGLang servers (see the package docstring)."""

    def __init__(self, tokenizer, urls: Sequence[str], model_names: set[str], config: ServerConfig = ServerConfig()):
        self.tokenizer, self.urls = tokenizer, tuple(urls)
        self.stop_ids = end_of_turn_ids(tokenizer)
        n = len(self.urls)
        self.stats = ServerStats(requests=[0] * n, sent_tokens=[0] * n, expected_cached=[0] * n)
        self.session = http.session(n * config.max_in_flight)
        self.config = config
        checked = [self._check_server(url, model_names) for url in self.urls]
        self.served, self.kinds = [model_id for model_id, _ in checked], [kind for _, kind in checked]
        self.config = config = replace(config, routing=_routing_for(self.urls, self.kinds, config.routing))
        self.router = Router(n, config.routing)
        bs, blocks = config.routing.block_size, config.routing.cache_tokens // config.routing.block_size
        self.schedulers = [make_scheduler(make_cache(blocks, bs), 1 << 30, config.order, config.dedup_min_tokens)
                           for _ in self.urls]
        self._ids = itertools.count()

    # ---------------------------------------------------------------- public API

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Continue each prompt (token ids); one Completion per prompt, in order, built as the other
        generators build it: end-of-turn token left out, text cut at the first stop string."""
        def body(kind, job: _Job) -> dict:
            return kind.generation(params, self.stop_ids, (params.seed + job.index) % (1 << 31))

        prompts = checked_prompts(prompts, "generate")
        jobs = [_Job(i, p, body, len(p) - 1, params.max_new_tokens) for i, p in enumerate(prompts)]
        self._run(jobs)
        out = [self._completion(job, params) for job in jobs]
        self.stats.add(out)
        return out

    def score_options(self, prompts: Sequence[Sequence[int]],
                      options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs [N, K] (fp32) of K options continuing each of N prompts, each summed over its
        tokens, exact, from the servers (module docstring; `Generator.score_options`)."""
        import torch

        if not options or any(len(o) == 0 for o in options):
            raise ValueError(f"score_options: every option needs at least one token, got {options!r}")
        prompts = checked_prompts(prompts, "score_options")
        if all(len(o) == 1 for o in options):
            ids = [o[0] for o in options]
            jobs = [_Job(i, p, lambda kind, job: kind.next_token(ids), len(p) - 1) for i, p in enumerate(prompts)]
            self._run(jobs)
            scores = [self._next_token_logprobs(job, ids) for job in jobs]
        else:
            jobs = [_Job(i, p + list(o), lambda kind, job: kind.prompt_scoring(job.logits_from), len(p))
                    for i, (p, o) in enumerate(itertools.product(prompts, options))]
            self._run(jobs)
            scores = [self._option_logprob(job, len(o)) for job, o in zip(jobs, itertools.cycle(options))]
        return torch.tensor(scores, dtype=torch.float32).reshape(len(prompts), len(options))

    # ---------------------------------------------------------------- sending

    def _run(self, jobs: list[_Job]) -> None:
        """Send every job (routed, then in each server's scheduler order, at most max_in_flight per
        server at once) and set job.result; the first job that fails for good raises ServerError."""
        for job in jobs:
            job.id, job.server = next(self._ids), self.router.route(job.tokens)
            self.schedulers[job.server].add(job.id, job.tokens, job.max_new, job.logits_from)
            job.queued = True
        by_id, in_flight, events = {job.id: job for job in jobs}, {}, queue.Queue()
        executor = ThreadPoolExecutor(max_workers=len(self.urls) * self.config.max_in_flight)
        try:
            ready, left = set(range(len(self.urls))), len(jobs)
            while left:
                for server in sorted(ready):
                    self._send_from(server, by_id, in_flight, executor, events)
                if not in_flight:
                    raise RuntimeError("server generator: requests wait but none is in flight; this is a bug")
                kind, job, payload = events.get()
                if kind == "error":
                    raise payload
                if kind == "prefilled":
                    self._prefilled(job)
                else:
                    del in_flight[job.id]
                    self._collect(job, payload)
                    left -= 1
                ready = {job.server}
        except BaseException:
            self._abandon([job for job in jobs if job.result is None])
            raise
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _send_from(self, server: int, by_id: dict, in_flight: dict, executor: ThreadPoolExecutor,
                   events: queue.Queue) -> None:
        """Admit the server's next requests in scheduler order while it has free slots."""
        busy = sum(1 for job in in_flight.values() if job.server == server)
        scheduler = self.schedulers[server]
        if busy >= self.config.max_in_flight or not scheduler.num_waiting:
            return
        out = scheduler.schedule(self.config.max_in_flight - busy)
        admitted = [(by_id[s.request_id], s.cached_len) for s in out.scheduled]
        admitted += [(by_id[f.request_id], 0) for f in out.failed]  # bigger than our model of its cache
        for f in out.failed:
            by_id[f.request_id].queued = False  # the scheduler dropped it; it is sent all the same
        for job, cached in admitted:
            self.stats.requests[server] += 1
            self.stats.sent_tokens[server] += len(job.tokens)
            self.stats.expected_cached[server] += cached
            kind = self.kinds[server]
            body = kind.request(job.tokens, self.served[server], job.make(kind, job))
            in_flight[job.id] = job
            executor.submit(self._request, server, body, job, events)

    def _request(self, server: int, body: dict, job: _Job, events: queue.Queue) -> None:
        """In a worker thread: send one job; events get ("prefilled", job, None) at its first streamed
        chunk, then ("done", job, result) or ("error", job, exception)."""
        try:
            result = http.post(self.session, self.urls[server], self.kinds[server], body,
                               timeout=self.config.timeout, retries=self.config.retries,
                               backoff=self.config.backoff, on_retry=self._count_retry,
                               on_first_chunk=lambda: events.put(("prefilled", job, None)))
            events.put(("done", job, result))
        except Exception as err:  # noqa: BLE001 - handed to the caller's thread, raised there
            events.put(("error", job, err))

    def _prefilled(self, job: _Job) -> None:
        """The server has computed the job's prompt (its first token came back): cache it in the
        scheduler's model now, so requests held back behind it go out."""
        if job.queued and not job.prefilled:
            self.schedulers[job.server].cache_computed(job.id, job.tokens)
            job.prefilled = True

    def _collect(self, job: _Job, result: dict) -> None:
        """A finished request: its result, its tokens cached in the scheduler's model."""
        job.result = result
        if job.queued:
            computed = job.tokens + (self.kinds[job.server].output(result)[0] or [])[:-1]
            self.schedulers[job.server].finish(job.id, computed[: len(job.tokens) + job.max_new])
            job.queued = False
        self.router.done(job.server)

    def _abandon(self, jobs: list[_Job]) -> None:
        """Release what the scheduler and the router hold for jobs that will not complete."""
        for job in jobs:
            if job.queued:
                self.schedulers[job.server].abort(job.id)
            if job.server >= 0:
                self.router.done(job.server)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    # ---------------------------------------------------------------- start-up checks

    def _check_server(self, url: str, model_names: set[str]) -> tuple[str, ServerKind]:
        """The id the server gives the model and the server's kind; ServerError if it is unreachable
        or serves another model or tokenizer. A card serves the model where the last part of its id
        or root, case aside, equals the last part of a name in `model_names`."""
        cards = http.models(self.session, url, self.config.connect_timeout)
        wanted = {_last_part(name) for name in model_names}
        served = [c for c in cards if {_last_part(c.get("id", "")), _last_part(c.get("root") or "")} & wanted]
        if not served:
            raise ServerModelError(f"server {url} serves {', '.join(c.get('id', '?') for c in cards) or 'no model'}, "
                              f"not {sorted(model_names)[0]}; start it with that model or pass --model")
        model_id = served[0]["id"]
        self._check_tokenizer(url, model_id)
        return model_id, self._kind(url, served[0])

    def _kind(self, url: str, card: dict) -> ServerKind:
        """The server's API: as configured, else as its model card says (owned_by), else SGLang where
        it answers SGLang's /get_model_info (or /model_info), else vLLM's."""
        name = self.config.server_kind
        if name == "auto":
            name = card.get("owned_by") if card.get("owned_by") in KINDS else None
        if name is None:
            sglang = http.get_json(url + "/get_model_info", self.session) or http.get_json(url + "/model_info", self.session)
            name = "sglang" if sglang else "vllm"
        return KINDS[name]

    def _check_tokenizer(self, url: str, model_id: str) -> None:
        text = self.tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        ours = self.tokenizer.encode(text, add_special_tokens=False)
        answer = http.tokenize(self.session, url, model_id, text, self.config.timeout)
        if answer is None:
            warnings.warn(f"server {url} has no /tokenize endpoint; its tokenizer is not checked", stacklevel=4)
            return
        theirs = answer.get("tokens")
        if theirs != ours:
            raise ServerModelError(f"server {url} tokenizes a probe chat differently from the local tokenizer of "
                              f"{model_id} ({_first_difference(ours, theirs)}); serve the same model and tokenizer")

    # ---------------------------------------------------------------- results

    def _completion(self, job: _Job, params: SamplingParams) -> Completion:
        tokens, text, finish = self.kinds[job.server].output(job.result)
        if finish and finish.startswith("abort"):
            raise ServerError(f"server {self.urls[job.server]} aborted a request ({first_line(finish)}); "
                              "check its log, then run the same command again to resume")
        if tokens is None:  # a server that does not return token ids: the text, tokenized here
            tokens = self.tokenizer.encode(text or "", add_special_tokens=False)
        ended = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        tokens = tokens if ended is None else tokens[:ended]
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        reason = "stop" if ended is not None or stopped or finish == "stop" else "length"
        return Completion(text.strip(), list(tokens), len(job.tokens), reason)

    def _next_token_logprobs(self, job: _Job, ids: list[int]) -> list[float]:
        """Full-vocabulary log-probs of `ids` as the token after the job's prompt."""
        kind = self.kinds[job.server]
        found = kind.next_token_logprobs(job.result)
        missing = [t for t in ids if t not in found]
        if missing:
            raise ServerError(f"server {self.urls[job.server]} returned no log-prob for option tokens {missing}; "
                              f"exact judge scores need {kind.scoring_needs}")
        return [found[t] for t in ids]

    def _option_logprob(self, job: _Job, length: int) -> float:
        """Sum of the prompt log-probs of the job's last `length` tokens (the option)."""
        kind = self.kinds[job.server]
        found = kind.prompt_logprobs(job.result, job.tokens)
        missing = [p for p in range(len(job.tokens) - length, len(job.tokens)) if p not in found]
        if missing:
            raise ServerError(f"server {self.urls[job.server]} returned no prompt log-prob for token "
                              f"{job.tokens[missing[0]]} at position {missing[0]}; multi-token options need "
                              f"{kind.prompt_scoring_needs}")
        return sum(found[p] for p in range(len(job.tokens) - length, len(job.tokens)))


def _routing_for(urls: Sequence[str], kinds: Sequence[ServerKind], routing: RoutingConfig) -> RoutingConfig:
    """`routing` with the block size and cache size the servers report (vLLM's /metrics, SGLang's
    /get_server_info), so the scheduler's and the router's trees model their caches; a warning for
    a server without prefix caching."""
    infos = [kind.cache_info(url) for url, kind in zip(urls, kinds)]
    for url, kind, info in zip(urls, kinds, infos):
        if info.get("prefix_caching") is False:
            warnings.warn(f"server {url} runs without prefix caching; {kind.prefix_cache_fix}", stacklevel=4)
    sizes = {i["block_size"] for i in infos if "block_size" in i}
    tokens = [i["cache_tokens"] for i in infos if "cache_tokens" in i]
    if len(sizes) != 1:
        return routing
    size = sizes.pop()
    return replace(routing, block_size=size, cache_tokens=max(min(tokens, default=routing.cache_tokens), size))


def _last_part(name: str) -> str:
    return Path(str(name).rstrip("/")).name.lower()


def _first_difference(ours: list[int], theirs) -> str:
    if not isinstance(theirs, list):
        return "no tokens returned"
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"{len(ours)} vs {len(theirs)} tokens, first difference at token {i}"

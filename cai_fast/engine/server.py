"""The server generator: generation and exact option scores from vLLM or SGLang servers.

    connect_servers(model, urls, ServerConfig()) -> ServerGenerator
        .generate(prompts, params) -> list[Completion]
        .score_options(prompts, options) -> Tensor [N, K]
        .kinds: the API each server speaks (_VLLM or _SGLang)
        .stats: ServerStats (per server: requests, prompt tokens sent, tokens our scheduler expects
                the server to find in its prefix cache; retries)

Prompts go out as token ids, so the chat template and the judge layout stay ours; the local
tokenizer (the model's, loaded without the weights) renders and decodes. At start each server must
answer `/v1/models` with the same model (the last part of its id or root, case aside, equals the
last part of `model` or its folder) and tokenize a probe chat exactly as the local tokenizer does
(`/tokenize`, which both vLLM and SGLang >= 0.5 have; a server without it is trusted, with a warning).

Two server kinds, one generator: what differs is a small strategy per server (`ServerConfig.server_kind`:
"auto" reads it from the server: `owned_by` of its `/v1/models` cards, "vllm" or "sglang", else
SGLang's own `/get_model_info`; otherwise vLLM's API is assumed). Routing, order, retries and
timeouts are the same for both.

- vLLM (its OpenAI API, as of vLLM 0.32): token-id prompts on `/v1/completions`, streamed; the token
  ids come back with `return_token_ids`. One-token options: full-vocabulary log-probs of exactly
  those ids at the next position (`logprob_token_ids`). Longer options: one request per (prompt,
  option) with the log-prob of every prompt token (`prompt_logprobs`), summed over the option;
  vLLM computes such prompts in full (it does not read its prefix cache then), hence the fallback.
  Block and cache size from its `/metrics` (`vllm:cache_config_info`).
- SGLang (its native API, as read in the SGLang 0.5.3 sources): `POST /generate` with `input_ids`
  and `sampling_params`; the answer carries `output_ids` (no re-tokenization) and
  `meta_info.finish_reason`. One-token options: `token_ids_logprob` with `max_new_tokens` 0 and
  `logprob_start_len` -1, read from `meta_info.output_token_ids_logprobs[0]` as (log-prob, id, text)
  triples -- the very request SGLang's own `/v1/score` sends inside the server. `/v1/score` itself is
  not used: it returns exp(log-prob) (0 below e^-745, where the label would be 0/0), and with
  `--multi-item-scoring-delimiter` it scores at a delimiter it inserts, silently another quantity.
  Longer options: `logprob_start_len` = the prompt's length, the option's log-probs read from
  `meta_info.input_token_logprobs` (the prompt itself read from SGLang's radix cache), each entry's
  token id checked against the option. Not streamed (a stream's output_ids are whole or deltas
  depending on a server flag), so a request held back (dedup_min_tokens) waits for the whole answer
  of the one it shares with; SGLang shares in-batch prefixes itself.
  The seed goes as `sampling_seed` (sampled text repeats only where SGLang honours it, e.g. under
  `--enable-deterministic-inference`); page size and cache size from `/get_server_info`.

Order and routing: every request of a call is routed to a server (cai_fast.scheduler.routing:
cache-aware by longest prefix with load balance, or round-robin) and queued in that server's
BatchScheduler (cai_fast.scheduler), whose radix tree models the server's prefix cache: what
completed requests computed there, in the server's block size and cache size where it reports
them (else `ServerConfig.routing`'s). Each server gets at most `max_in_flight` requests at once,
taken in the scheduler's order (longest cached prefix first, policy `order`), and a request that
shares `dedup_min_tokens` or more not-yet-cached tokens with one in the same batch is held back
until the server has computed that one's prompt, so it computes the shared prefix once: a
streamed generation releases the requests behind it at its first chunk (its first token), any
other request when it is answered. order="fcfs" with dedup_min_tokens=0 is plain submission
order. The default is dedup_min_tokens=0: measured on vLLM 0.32 (benches/README.md), vLLM
computes a prefix shared within its batch once by itself, so holding requests back only added
latency (1.3x on SL-CAI, 1.8x on the judge, for the same tokens computed); the hold-back is there
for servers that do not.

Sampling: temperature, top_p (top-k off), a seed per request (params.seed + its index in the
call), stop strings and the tokenizer's end-of-turn ids, max tokens. The Completion is built as
the other generators build it: end-of-turn token left out, text cut at the first stop string.

Exact scores, never a top-k list: label(a, b) + label(b, a) = 1 holds through either kind.

Faults: a connection error, a timeout or a 5xx is retried `retries` times with exponential backoff
(`backoff` seconds, doubled each time); a 4xx or the last failure raises ServerError, one line
naming the server and what to do. Nothing is returned from a call that failed, so a caller that
appends its records after each call (sl-cai, label) loses nothing and resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..config import option
from ..scheduler import make_cache, make_scheduler
from ..scheduler.routing import RoutingConfig, Router
from .base import Completion, GenerationStats, SamplingParams, cut_at_stop, end_of_turn_ids

if TYPE_CHECKING:
    import torch

PROBE_CHAT = [{"role": "user", "content": "Which response is less harmful, (A) or (B)? Naïve café, 42 ✓"}]
SERVER_KINDS = ("auto", "vllm", "sglang")


class ServerError(RuntimeError):
    """A server is unreachable, failed a request, or does not serve the expected model; one line."""


class ServerModelError(ServerError):
    """A server serves another model (or another tokenizer) than the one asked for."""


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


class _VLLM:
    """vLLM's OpenAI API (module docstring): request bodies and how to read the answers."""

    name, path = "vllm", "/v1/completions"
    scoring_needs = "logprob_token_ids and return_tokens_as_token_ids on /v1/completions (vLLM >= 0.32 has them)"
    prompt_scoring_needs = "prompt_logprobs on /v1/completions (vLLM has it)"
    prefix_cache_fix = "start it with --enable-prefix-caching"
    missing_fix = ("serve the model with vLLM's OpenAI server, or pass ServerConfig(server_kind='sglang') "
                   "for an SGLang server")

    @staticmethod
    def request(tokens: list[int], model_id: str, body: dict) -> dict:
        return {"model": model_id, "prompt": tokens, **body}

    @staticmethod
    def generation(params: SamplingParams, stop_ids: list[int], seed: int) -> dict:
        return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": -1, "stop": list(params.stop), "stop_token_ids": stop_ids, "seed": seed,
                "skip_special_tokens": True, "return_token_ids": True, "stream": True}

    @staticmethod
    def next_token(ids: list[int]) -> dict:
        return {"max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True}

    @staticmethod
    def prompt_scoring(prompt_len: int) -> dict:
        return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

    @staticmethod
    def output(result: dict) -> tuple[list[int] | None, str, str | None]:
        """(token ids or None, text, finish reason) of an answer."""
        choice = _choice(result)
        return choice.get("token_ids"), choice.get("text", ""), choice.get("finish_reason")

    @staticmethod
    def next_token_logprobs(result: dict) -> dict[int, float]:
        """{token id: log-prob} at the position after the prompt."""
        first = ((_choice(result).get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
        return {int(k.rpartition(":")[2]): float(v) for k, v in first.items() if k.startswith("token_id:")}

    @staticmethod
    def prompt_logprobs(result: dict, tokens: list[int]) -> dict[int, float]:
        """{position: log-prob of tokens[position]} over the prompt."""
        entries = _choice(result).get("prompt_logprobs") or result.get("prompt_logprobs") or []
        values = {i: (entry or {}).get(str(token)) for i, (token, entry) in enumerate(zip(tokens, entries))}
        return {i: v["logprob"] if isinstance(v, dict) else float(v) for i, v in values.items() if v is not None}

    @staticmethod
    def cache_info(url: str) -> dict:
        """block_size, cache_tokens and prefix_caching, where the server reports them (/metrics)."""
        labels = cache_config(url)
        info = {key: int(labels[name]) for key, name in (("block_size", "block_size"),
                                                          ("cache_tokens", "kv_cache_size_tokens"))
                if labels.get(name, "").isdigit()}
        if "enable_prefix_caching" in labels:
            info["prefix_caching"] = labels["enable_prefix_caching"] != "False"
        return info


class _SGLang:
    """SGLang's native API (module docstring): request bodies and how to read the answers."""

    name, path = "sglang", "/generate"
    scoring_needs = "token_ids_logprob on /generate (SGLang >= 0.4.4 has it)"
    prompt_scoring_needs = "logprob_start_len and input_token_logprobs on /generate (SGLang has them)"
    prefix_cache_fix = "start it without --disable-radix-cache"
    missing_fix = ("serve the model with `python -m sglang.launch_server`, or pass ServerConfig(server_kind='vllm') "
                   "for a vLLM server")

    @staticmethod
    def request(tokens: list[int], model_id: str, body: dict) -> dict:
        return {"input_ids": tokens, **body}

    @staticmethod
    def generation(params: SamplingParams, stop_ids: list[int], seed: int) -> dict:
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                    "top_k": -1, "stop": list(params.stop), "stop_token_ids": stop_ids, "skip_special_tokens": True}
        if params.temperature > 0:  # greedy needs no seed (and SGLang < 0.5.3 knows no sampling_seed)
            sampling["sampling_seed"] = seed
        return {"sampling_params": sampling}

    @staticmethod
    def next_token(ids: list[int]) -> dict:
        return {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": -1,
                "token_ids_logprob": ids}

    @staticmethod
    def prompt_scoring(prompt_len: int) -> dict:
        return {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": prompt_len}

    @staticmethod
    def output(result: dict) -> tuple[list[int] | None, str, str | None]:
        """(token ids or None, text, finish reason) of an answer; an abort's reason is "abort: <why>"."""
        finish = _meta(result).get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else finish
        if reason == "abort":
            reason = f"abort: {finish.get('message', '') if isinstance(finish, dict) else ''}"
        return result.get("output_ids"), result.get("text", ""), reason

    @staticmethod
    def next_token_logprobs(result: dict) -> dict[int, float]:
        """{token id: log-prob} at the position after the prompt: (log-prob, id, text) triples."""
        entries = (_meta(result).get("output_token_ids_logprobs") or [None])[0] or []
        return {int(e[1]): float(e[0]) for e in entries if e and e[0] is not None}

    @staticmethod
    def prompt_logprobs(result: dict, tokens: list[int]) -> dict[int, float]:
        """{position: log-prob of tokens[position]}: the entries end at the prompt's last token; an
        entry whose token id is not the prompt's there is left out."""
        entries = _meta(result).get("input_token_logprobs") or []
        start = len(tokens) - len(entries)
        return {start + j: float(e[0]) for j, e in enumerate(entries)
                if start + j >= 0 and e and e[0] is not None and e[1] == tokens[start + j]}

    @staticmethod
    def cache_info(url: str) -> dict:
        """block_size (page size), cache_tokens and prefix_caching, from /get_server_info (or /server_info)."""
        data = _get_json(url + "/get_server_info") or _get_json(url + "/server_info")
        info = {key: data[name] for key, name in (("block_size", "page_size"), ("cache_tokens", "max_total_num_tokens"))
                if isinstance(data.get(name), int) and data[name] > 0}
        if "disable_radix_cache" in data:
            info["prefix_caching"] = not data["disable_radix_cache"]
        return info


KINDS = {"vllm": _VLLM, "sglang": _SGLang}


@dataclass
class _Job:
    index: int  # position in the caller's list
    tokens: list[int]  # what is sent: the prompt (generation) or prompt + option (scoring)
    make: Callable[[type, "_Job"], dict]  # its request body for a server kind, less the prompt and the model
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
    from .loading import load_tokenizer, resolve_model_path

    return ServerGenerator(load_tokenizer(model), parse_urls(urls), {model, str(resolve_model_path(model))}, config)


class ServerGenerator:
    """Generation and scoring on vLLM or SGLang servers (see the module docstring)."""

    def __init__(self, tokenizer, urls: Sequence[str], model_names: set[str], config: ServerConfig = ServerConfig()):
        self.tokenizer, self.urls = tokenizer, tuple(urls)
        self.stop_ids = end_of_turn_ids(tokenizer)
        n = len(self.urls)
        self.stats = ServerStats(requests=[0] * n, sent_tokens=[0] * n, expected_cached=[0] * n)
        self.session = _session(n * config.max_in_flight)
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
        """Continue each prompt (token ids); one Completion per prompt, in order."""
        def body(kind, job: _Job) -> dict:
            return kind.generation(params, self.stop_ids, (params.seed + job.index) % (1 << 31))

        prompts = _checked(prompts, "generate")
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
        prompts = _checked(prompts, "score_options")
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
            result = self._post(self.urls[server], self.kinds[server].path, body,
                                lambda: events.put(("prefilled", job, None)))
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

    def _post(self, url: str, path: str, body: dict, on_first_chunk=None) -> dict:
        """POST with retries on connection errors, timeouts and 5xx; ServerError otherwise. A
        streamed answer (body["stream"]) is read to its end, on_first_chunk() called at its first chunk."""
        import requests

        stream = bool(body.get("stream"))
        for attempt in range(self.config.retries + 1):
            try:
                response = self.session.post(url + path, json=body, timeout=self.config.timeout, stream=stream)
                if response.status_code < 400:
                    return _read_stream(response, on_first_chunk) if stream else response.json()
            except requests.RequestException as err:
                problem = f"{type(err).__name__}: {_first_line(err)}"
            else:
                problem = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code == 404 and url in self.urls:
                    kind = self.kinds[self.urls.index(url)]
                    raise ServerError(f"server {url} has no {path} endpoint ({problem}), which cai_fast uses on "
                                      f"{kind.name} servers; {kind.missing_fix}")
                if response.status_code < 500:
                    raise ServerError(f"server {url} refused {path}: {problem}")
            if attempt < self.config.retries:
                self.stats.retries += 1
                time.sleep(self.config.backoff * 2 ** attempt)
        raise ServerError(f"server {url} failed {path} after {self.config.retries + 1} tries ({problem}); "
                          "check that it is running, then run the same command again to resume")

    # ---------------------------------------------------------------- start-up checks

    def _check_server(self, url: str, model_names: set[str]) -> tuple[str, type]:
        """The id the server gives the model and the server's kind; ServerError if it is unreachable
        or serves another model or tokenizer."""
        cards = self._models(url)
        wanted = {_last_part(name) for name in model_names}
        served = [c for c in cards if {_last_part(c.get("id", "")), _last_part(c.get("root") or "")} & wanted]
        if not served:
            raise ServerModelError(f"server {url} serves {', '.join(c.get('id', '?') for c in cards) or 'no model'}, "
                              f"not {sorted(model_names)[0]}; start it with that model or pass --model")
        model_id = served[0]["id"]
        self._check_tokenizer(url, model_id)
        return model_id, self._kind(url, served[0])

    def _kind(self, url: str, card: dict) -> type:
        """The server's API: as configured, else as its model card says (owned_by), else SGLang where
        it answers SGLang's /get_model_info (or /model_info), else vLLM's."""
        name = self.config.server_kind
        if name == "auto":
            name = card.get("owned_by") if card.get("owned_by") in KINDS else None
        if name is None:
            sglang = _get_json(url + "/get_model_info", self.session) or _get_json(url + "/model_info", self.session)
            name = "sglang" if sglang else "vllm"
        return KINDS[name]

    def _models(self, url: str) -> list[dict]:
        import requests

        deadline = time.monotonic() + self.config.connect_timeout
        while True:
            try:
                response = self.session.get(url + "/v1/models", timeout=min(10.0, self.config.connect_timeout))
                if response.status_code == 200:
                    return response.json().get("data", [])
                problem = f"HTTP {response.status_code}"
            except requests.RequestException as err:
                problem = type(err).__name__
            if time.monotonic() > deadline:
                raise ServerError(f"server {url} is unreachable ({problem} on /v1/models for "
                                  f"{self.config.connect_timeout:g} s); start it or fix --server-url")
            time.sleep(0.5)

    def _check_tokenizer(self, url: str, model_id: str) -> None:
        text = self.tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        ours = self.tokenizer.encode(text, add_special_tokens=False)
        response = self.session.post(url + "/tokenize", timeout=self.config.timeout,
                                     json={"model": model_id, "prompt": text, "add_special_tokens": False})
        if response.status_code == 404:
            warnings.warn(f"server {url} has no /tokenize endpoint; its tokenizer is not checked", stacklevel=4)
            return
        theirs = response.json().get("tokens") if response.status_code == 200 else None
        if theirs != ours:
            raise ServerModelError(f"server {url} tokenizes a probe chat differently from the local tokenizer of "
                              f"{model_id} ({_first_difference(ours, theirs)}); serve the same model and tokenizer")

    # ---------------------------------------------------------------- results

    def _completion(self, job: _Job, params: SamplingParams) -> Completion:
        tokens, text, finish = self.kinds[job.server].output(job.result)
        if finish and finish.startswith("abort"):
            raise ServerError(f"server {self.urls[job.server]} aborted a request ({_first_line(finish)}); "
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


def prefix_cache_counters(url: str) -> dict[str, float]:
    """A vLLM server's running totals from /metrics: prefix-cache queries and hits (tokens), prompt
    tokens and generated tokens; {} where the server does not report them."""
    names = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
             "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generated_tokens"}
    totals: dict[str, float] = {}
    for line in _metrics(url):
        name = line.split("{")[0].split(" ")[0]
        if name in names:
            totals[names[name]] = totals.get(names[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def cache_config(url: str) -> dict[str, str]:
    """The labels of a vLLM server's `vllm:cache_config_info` metric (block_size,
    kv_cache_size_tokens, enable_prefix_caching, ...); {} where it does not report them."""
    line = next((line for line in _metrics(url) if line.startswith("vllm:cache_config_info{")), "")
    return dict(re.findall(r'(\w+)="([^"]*)"', line.partition("{")[2].rpartition("}")[0]))


def _metrics(url: str) -> list[str]:
    import requests

    try:
        response = requests.get(url + "/metrics", timeout=10)
    except requests.RequestException:
        return []
    return response.text.splitlines() if response.status_code == 200 else []


def _routing_for(urls: Sequence[str], kinds: Sequence[type], routing: RoutingConfig) -> RoutingConfig:
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


def _get_json(url: str, session=None) -> dict:
    """The JSON object a GET of `url` answers with; {} on any failure (the caller has a default)."""
    import requests

    try:
        response = (session or requests).get(url, timeout=10)
        data = response.json() if response.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _session(connections: int):
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, connections))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _checked(prompts: Sequence[Sequence[int]], caller: str) -> list[list[int]]:
    prompts = [[int(t) for t in p] for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"{caller}: prompts {empty} are empty; every prompt needs at least one token")
    return prompts


def _read_stream(response, on_first_chunk) -> dict:
    """A streamed completion (server-sent events) as one answer: the chunks' text and token ids
    joined. A stream that ends before its finish_reason is a ConnectionError (retried)."""
    import requests

    choice, token_ids = {"text": "", "finish_reason": None}, None
    for line in response.iter_lines(chunk_size=None):  # each event as it arrives
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        delta = _choice(json.loads(line[6:]))
        if on_first_chunk is not None:
            on_first_chunk()
            on_first_chunk = None
        choice["text"] += delta.get("text") or ""
        if delta.get("token_ids") is not None:
            token_ids = (token_ids or []) + list(delta["token_ids"])
        choice["finish_reason"] = delta.get("finish_reason") or choice["finish_reason"]
    if choice["finish_reason"] is None:
        raise requests.ConnectionError("the stream ended before the completion did")
    return {"choices": [{**choice, "token_ids": token_ids}]}


def _choice(result: dict) -> dict:
    choices = result.get("choices") or [{}]
    return choices[0]


def _meta(result: dict) -> dict:
    return result.get("meta_info") or {}


def _last_part(name: str) -> str:
    return Path(str(name).rstrip("/")).name.lower()


def _first_line(err) -> str:
    return (str(err).splitlines() or [""])[0][:200]


def _error_message(response) -> str:
    try:
        payload = response.json()
        message = payload.get("error", payload)
        message = message.get("message", message) if isinstance(message, dict) else message
    except ValueError:
        message = response.text
    return (str(message).splitlines() or [""])[0][:300]


def _first_difference(ours: list[int], theirs) -> str:
    if not isinstance(theirs, list):
        return "no tokens returned"
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"{len(ours)} vs {len(theirs)} tokens, first difference at token {i}"

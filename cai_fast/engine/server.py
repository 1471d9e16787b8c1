"""The server generator: generation and exact option scores from OpenAI-compatible servers.

    connect_servers(model, urls, ServerConfig()) -> ServerGenerator
        .generate(prompts, params) -> list[Completion]
        .score_options(prompts, options) -> Tensor [N, K]
        .stats: ServerStats (per server: requests, prompt tokens sent, tokens our scheduler expects
                the server to find in its prefix cache; retries)

Prompts go out as token ids to `/v1/completions`, so the chat template and the judge layout stay
ours; the local tokenizer (the model's, loaded without the weights) renders and decodes. At start
each server must answer `/v1/models` with the same model (the last part of its id or root, case
aside, equals the last part of `model` or its folder) and tokenize a probe chat exactly as the
local tokenizer does (`/tokenize`; a server without that endpoint is trusted, with a warning).

Order and routing: every request of a call is routed to a server (cai_fast.scheduler.routing:
cache-aware by longest prefix with load balance, or round-robin) and queued in that server's
BatchScheduler (cai_fast.scheduler), whose radix tree models the server's prefix cache: what
completed requests computed there, in the server's block size and cache size where it reports
them (vLLM's `vllm:cache_config_info`; else `ServerConfig.routing`'s). Each server gets at most
`max_in_flight` requests at once, taken in the scheduler's order (longest cached prefix first,
policy `order`), and a request that shares `dedup_min_tokens` or more not-yet-cached tokens with
one in the same batch is held back until the server has computed that one's prompt, so it
computes the shared prefix once: generation is streamed, and a request's first chunk (its first
token) releases the requests behind it; a scoring request releases them when it is answered.
order="fcfs" with dedup_min_tokens=0 is plain submission order. The default is dedup_min_tokens=0:
measured on vLLM 0.32 (benches/README.md), vLLM computes a prefix shared within its batch once by
itself, so holding requests back only added latency (1.3x on SL-CAI, 1.8x on the judge, for the
same tokens computed); the hold-back is there for servers that do not.

Sampling: temperature, top_p (top-k off), a seed per request (params.seed + its index in the
call), stop strings and the tokenizer's end-of-turn ids, max tokens. The Completion is built as
the other generators build it: end-of-turn token left out, text cut at the first stop string.

Exact scores, never a top-k list. One-token options (the judge's usual case): one request per
prompt asks for the full-vocabulary log-probs of exactly those token ids at the next position
(vLLM's `logprob_token_ids`; the prompt is read from the prefix cache like any other). Longer
options: one request per (prompt, option) with the server's log-probs of every prompt token
(`prompt_logprobs`), summed over the option's tokens; vLLM computes such prompts in full (it does
not read its prefix cache when prompt log-probs are asked for), which is why it is the fallback.

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
from typing import TYPE_CHECKING, Sequence

from ..config import option
from ..scheduler import make_cache, make_scheduler
from ..scheduler.routing import RoutingConfig, Router
from .base import Completion, GenerationStats, SamplingParams, cut_at_stop, end_of_turn_ids

if TYPE_CHECKING:
    import torch

PROBE_CHAT = [{"role": "user", "content": "Which response is less harmful, (A) or (B)? Naïve café, 42 ✓"}]


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
                                      "(0 = never: vLLM shares in-batch prefixes itself)")
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self):
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
    body: dict  # the request body, less the model and the prompt
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
    """Generation and scoring on OpenAI-compatible servers (see the module docstring)."""

    def __init__(self, tokenizer, urls: Sequence[str], model_names: set[str], config: ServerConfig = ServerConfig()):
        self.tokenizer, self.urls = tokenizer, tuple(urls)
        self.stop_ids = end_of_turn_ids(tokenizer)
        n = len(self.urls)
        self.stats = ServerStats(requests=[0] * n, sent_tokens=[0] * n, expected_cached=[0] * n)
        self.session = _session(n * config.max_in_flight)
        self.config = config
        self.served = [self._check_server(url, model_names) for url in self.urls]
        self.config = config = replace(config, routing=_routing_for(self.urls, config.routing))
        self.router = Router(n, config.routing)
        bs, blocks = config.routing.block_size, config.routing.cache_tokens // config.routing.block_size
        self.schedulers = [make_scheduler(make_cache(blocks, bs), 1 << 30, config.order, config.dedup_min_tokens)
                           for _ in self.urls]
        self._ids = itertools.count()

    # ---------------------------------------------------------------- public API

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Continue each prompt (token ids); one Completion per prompt, in order."""
        body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": -1, "stop": list(params.stop), "stop_token_ids": self.stop_ids,
                "skip_special_tokens": True, "return_token_ids": True, "stream": True}
        jobs = [_Job(i, p, {**body, "seed": (params.seed + i) % (1 << 31)}, len(p) - 1, params.max_new_tokens)
                for i, p in enumerate(_checked(prompts, "generate"))]
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
            body = {"max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "logprob_token_ids": ids,
                    "return_tokens_as_token_ids": True}
            jobs = [_Job(i, p, body, len(p) - 1) for i, p in enumerate(prompts)]
            self._run(jobs)
            scores = [_next_token_logprobs(job, ids, self.urls[job.server]) for job in jobs]
        else:
            body = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            jobs = [_Job(i, p + list(o), body, len(p)) for i, (p, o) in enumerate(itertools.product(prompts, options))]
            self._run(jobs)
            scores = [_option_logprob(job, len(o), self.urls[job.server])
                      for job, o in zip(jobs, itertools.cycle(options))]
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
            body = {"model": self.served[server], "prompt": job.tokens, **job.body}
            in_flight[job.id] = job
            executor.submit(self._request, self.urls[server], body, job, events)

    def _request(self, url: str, body: dict, job: _Job, events: queue.Queue) -> None:
        """In a worker thread: send one job; events get ("prefilled", job, None) at its first streamed
        chunk, then ("done", job, result) or ("error", job, exception)."""
        try:
            result = self._post(url, "/v1/completions", body, lambda: events.put(("prefilled", job, None)))
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
            computed = job.tokens + (_choice(job.result).get("token_ids") or [])[:-1]
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
                if response.status_code < 500:
                    raise ServerError(f"server {url} refused {path}: {problem}")
            if attempt < self.config.retries:
                self.stats.retries += 1
                time.sleep(self.config.backoff * 2 ** attempt)
        raise ServerError(f"server {url} failed {path} after {self.config.retries + 1} tries ({problem}); "
                          "check that it is running, then run the same command again to resume")

    # ---------------------------------------------------------------- start-up checks

    def _check_server(self, url: str, model_names: set[str]) -> str:
        """The id the server gives the model; ServerError if it is unreachable or serves another
        model or tokenizer."""
        cards = self._models(url)
        wanted = {_last_part(name) for name in model_names}
        served = [c for c in cards if {_last_part(c.get("id", "")), _last_part(c.get("root") or "")} & wanted]
        if not served:
            raise ServerModelError(f"server {url} serves {', '.join(c.get('id', '?') for c in cards) or 'no model'}, "
                              f"not {sorted(model_names)[0]}; start it with that model or pass --model")
        model_id = served[0]["id"]
        self._check_tokenizer(url, model_id)
        return model_id

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
        choice = _choice(job.result)
        tokens = choice.get("token_ids")
        if tokens is None:  # a server that does not return token ids: the text, tokenized here
            tokens = self.tokenizer.encode(choice.get("text", ""), add_special_tokens=False)
        ended = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        tokens = tokens if ended is None else tokens[:ended]
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        reason = "stop" if ended is not None or stopped or choice.get("finish_reason") == "stop" else "length"
        return Completion(text.strip(), list(tokens), len(job.tokens), reason)


def prefix_cache_counters(url: str) -> dict[str, float]:
    """A vLLM server's running totals from /metrics: prefix-cache queries and hits (tokens) and
    prompt tokens; {} where the server does not report them."""
    names = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
             "vllm:prompt_tokens_total": "prompt_tokens"}
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


def _routing_for(urls: Sequence[str], routing: RoutingConfig) -> RoutingConfig:
    """`routing` with the block size and cache size the servers report (vLLM's /metrics), so the
    scheduler's and the router's trees model their caches; a warning for a server without prefix caching."""
    infos = [cache_config(url) for url in urls]
    for url, info in zip(urls, infos):
        if info.get("enable_prefix_caching") == "False":
            warnings.warn(f"server {url} runs without prefix caching; start it with --enable-prefix-caching",
                          stacklevel=4)
    sizes = [int(i["block_size"]) for i in infos if i.get("block_size", "").isdigit()]
    tokens = [int(i["kv_cache_size_tokens"]) for i in infos if i.get("kv_cache_size_tokens", "").isdigit()]
    if not sizes or len(set(sizes)) > 1:
        return routing
    return replace(routing, block_size=sizes[0], cache_tokens=max(min(tokens, default=routing.cache_tokens), sizes[0]))


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


def _next_token_logprobs(job: _Job, ids: list[int], url: str) -> list[float]:
    """Full-vocabulary log-probs of `ids` as the token after the job's prompt (vLLM's logprob_token_ids)."""
    logprobs = _choice(job.result).get("logprobs") or {}
    first = (logprobs.get("top_logprobs") or [None])[0] or {}
    missing = [t for t in ids if f"token_id:{t}" not in first]
    if missing:
        raise ServerError(f"server {url} returned no log-prob for option tokens {missing}; it must support "
                          "logprob_token_ids and return_tokens_as_token_ids on /v1/completions (vLLM >= 0.32 does)")
    return [float(first[f"token_id:{t}"]) for t in ids]


def _option_logprob(job: _Job, length: int, url: str) -> float:
    """Sum of the prompt log-probs of the job's last `length` tokens (the option)."""
    entries = _choice(job.result).get("prompt_logprobs") or job.result.get("prompt_logprobs")
    total = 0.0
    for position in range(len(job.tokens) - length, len(job.tokens)):
        token = job.tokens[position]
        entry = (entries[position] or {}) if entries and position < len(entries) else {}
        value = entry.get(str(token), entry.get(token))
        if value is None:
            raise ServerError(f"server {url} returned no prompt log-prob for token {token} at position {position}; "
                              "it must support prompt_logprobs on /v1/completions (vLLM does)")
        total += value["logprob"] if isinstance(value, dict) else float(value)
    return total


def _last_part(name: str) -> str:
    return Path(str(name).rstrip("/")).name.lower()


def _first_line(err: Exception) -> str:
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

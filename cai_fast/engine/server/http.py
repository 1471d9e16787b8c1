"""HTTP to the servers: one pooled requests.Session, one plain function per endpoint, and the
mapping of every failure to a one-line ServerError.

    session(connections) -> requests.Session
    post(...): retried on a connection error, a timeout, a 429, a 5xx or an answer that is not JSON
        (exponential backoff with jitter, at least the Retry-After a 429 or 503 asks for); refused
        credentials (401/403), an unknown model (404 naming it), another 4xx or the last failure is a
        ServerError naming the server and what to do
    models(...): /v1/models, waited for until a deadline; tokenize(...): /tokenize (None without it)
    get_json, prefix_cache_counters, cache_config: what a server reports; {} where it does not
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import TYPE_CHECKING, Callable

import requests
from requests.adapters import HTTPAdapter

if TYPE_CHECKING:
    from .kinds import ServerKind


class ServerError(RuntimeError):
    """A server is unreachable, failed a request, or does not serve the expected model; one line."""


class ServerModelError(ServerError):
    """A server serves another model (or another tokenizer) than the one asked for."""


def session(connections: int) -> requests.Session:
    """A Session whose pool keeps `connections` connections (at least 10) open to each server."""
    out = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, connections))
    out.mount("http://", adapter)
    out.mount("https://", adapter)
    return out


def post(client: requests.Session, url: str, kind: ServerKind, body: dict, *, timeout: float, retries: int,
         backoff: float, on_retry: Callable[[], None], on_first_chunk: Callable[[], None] | None = None) -> dict:
    """POST `body` to the kind's endpoint, retrying connection errors, timeouts, 429s, 5xx and answers
    (or streamed events) that are not JSON (on_retry() before each retry, after backoff * 2**attempt
    seconds times a random factor in [0.5, 1], and at least the answer's Retry-After); ServerError
    otherwise, and at once where Retry-After asks for more than `timeout` seconds. A streamed answer
    (body["stream"]) is read to its end, on_first_chunk() called at its first chunk."""
    path, stream = kind.path, bool(body.get("stream"))
    for attempt in range(retries + 1):
        wait = 0.0
        try:
            response = client.post(url + path, json=body, timeout=timeout, stream=stream)
            if response.status_code < 400:
                return read_stream(response, on_first_chunk) if stream else response.json()
        except (requests.RequestException, json.JSONDecodeError) as err:  # json's: a streamed event not JSON
            problem = f"{type(err).__name__}: {first_line(err)}"
        else:
            problem = _refusal(url, kind, body, response)
            wait = retry_after(response)
            if wait > timeout:
                raise ServerError(f"server {url} asks to wait {wait:g} s before {path} again ({problem}); "
                                  "run the same command again later to resume")
        if attempt < retries:
            on_retry()
            time.sleep(max(wait, backoff * 2 ** attempt * random.uniform(0.5, 1.0)))
    raise ServerError(f"server {url} failed {path} after {retries + 1} tries ({problem}); "
                      "check that it is running, then run the same command again to resume")


def _refusal(url: str, kind: ServerKind, body: dict, response: requests.Response) -> str:
    """The problem of an error answer worth retrying (429, 5xx), as text; ServerError for the others:
    credentials refused (401/403; the server's message is left out, as it may quote the key), the
    model unknown (404 naming it, or code model_not_found), no such endpoint (404), another 4xx."""
    status, path = response.status_code, kind.path
    message, code = _error_fields(response)
    if status in (401, 403):
        raise ServerError(f"server {url} refused the credentials for {path} (HTTP {status}"
                          f"{f', {code}' if code else ''}); {kind.auth_fix}")
    problem = f"HTTP {status}: {message}"
    model = body.get("model")
    if status == 404 and (code == "model_not_found" or (isinstance(model, str) and model and model in message)):
        raise ServerModelError(f"server {url} does not serve model {model!r} ({problem}); pass a model it "
                               "serves with --model (GET /v1/models lists them)")
    if status == 404:
        raise ServerError(f"server {url} has no {path} endpoint ({problem}), which cai_fast uses on "
                          f"{kind.name} servers; {kind.missing_fix}")
    if status == 429 and code == "insufficient_quota":
        raise ServerError(f"server {url} refused {path}: {problem}; the account's quota is spent, add credit, "
                          "then run the same command again to resume")
    if status < 500 and status != 429:
        raise ServerError(f"server {url} refused {path}: {problem}")
    return problem


def retry_after(response: requests.Response) -> float:
    """The seconds a 429 or 503 answer's Retry-After header asks to wait (a number or an HTTP date), 0 without one."""
    value = response.headers.get("Retry-After", "").strip()
    if response.status_code not in (429, 503) or not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return 0.0


def models(client: requests.Session, url: str, connect_timeout: float) -> list[dict]:
    """The model cards of /v1/models, asked every 0.5 s until the server answers; ServerError
    after `connect_timeout` seconds."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            response = client.get(url + "/v1/models", timeout=min(10.0, connect_timeout))
            if response.status_code == 200:
                return response.json().get("data", [])
            problem = f"HTTP {response.status_code}"
        except requests.RequestException as err:
            problem = type(err).__name__
        if time.monotonic() > deadline:
            raise ServerError(f"server {url} is unreachable ({problem} on /v1/models for "
                              f"{connect_timeout:g} s); start it or fix --server-url")
        time.sleep(0.5)


def tokenize(client: requests.Session, url: str, model_id: str, text: str, timeout: float) -> dict | None:
    """The answer of /tokenize for `text` (no special tokens added; its "tokens" are the server's
    ids), {} on an error status, None where the server has no /tokenize endpoint."""
    response = client.post(url + "/tokenize", timeout=timeout,
                           json={"model": model_id, "prompt": text, "add_special_tokens": False})
    if response.status_code == 404:
        return None
    return response.json() if response.status_code == 200 else {}


def get_json(url: str, client: requests.Session | None = None) -> dict:
    """The JSON object a GET of `url` answers with; {} on any failure (the caller has a default)."""
    try:
        response = (client or requests).get(url, timeout=10)
        data = response.json() if response.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def read_stream(response: requests.Response, on_first_chunk: Callable[[], None] | None) -> dict:
    """A streamed completion (server-sent events) as one answer: the chunks' text and token ids
    joined. A stream that ends before its finish_reason is a ConnectionError, an event that is not
    JSON a json.JSONDecodeError (both retried by post)."""
    choice, token_ids = {"text": "", "finish_reason": None}, None
    for line in response.iter_lines(chunk_size=None):  # each event as it arrives
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        delta = first_choice(json.loads(line[6:]))
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


def first_choice(result: dict) -> dict:
    """The first of an OpenAI-style answer's "choices"; {} where it has none."""
    choices = result.get("choices") or [{}]
    return choices[0]


def first_line(err) -> str:
    return (str(err).splitlines() or [""])[0][:200]


def _metrics(url: str) -> list[str]:
    try:
        response = requests.get(url + "/metrics", timeout=10)
    except requests.RequestException:
        return []
    return response.text.splitlines() if response.status_code == 200 else []


def _error_fields(response: requests.Response) -> tuple[str, str]:
    """(the first line of an error answer's message, its error code or "") from OpenAI's
    {"error": {"message", "code"}}, SGLang's {"message"}, or the text."""
    try:
        payload = response.json()
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
    except ValueError:
        error = response.text
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    return (str(message).splitlines() or [""])[0][:300], code if isinstance(code, str) else ""

"""The openai engine: generation and option log-probs from an OpenAI-compatible chat API.

    connect_chat_api(url, model, ChatAPIConfig(api_key_env=...)) -> ChatAPIGenerator:
        .generate_chats(chats, params) -> [Completion], .option_logprobs(chats, letters) -> (logp, outside),
        .logprobs (whether the API gives top_logprobs), .stats: ChatAPIStats (tokens from `usage`, requests, retries)

A hosted model (OpenAI, or any provider or vLLM/SGLang server with `/v1/chat/completions`) gets chat
messages, not token ids: the server applies its own chat template, and no tokenizer is loaded here
(`tokenizer` is None; callers hand over messages through `cai_fast.engine.base.complete_chats`).
The vLLM/SGLang server engine's machinery (token-id prompts, a local tokenizer checked against the
server's, prefix routing, full-vocabulary option scores) needs all three of what such an API does
not have, so this is an engine of its own, not a ServerKind; it shares their HTTP (http.post: retries
with backoff, jitter and Retry-After; one-line errors).

The API key is read from the environment variable `api_key_env` (SL-CAI's critic and reviser: their own
`critique_api_key_env` / `revision_api_key_env`, else the policy's) and sent as a Bearer header only; it
is never in a request body, a message, a run config or a summary. At start one request of one token
checks the key and the model (one-line ServerError otherwise) and whether the API answers
`top_logprobs` (`.logprobs`). Option log-probs are those of the first answer token among the
`top_logprobs` best: tokens that are an option's letter once spaces, brackets and punctuation are
stripped are summed (log-sum-exp); an option not among them gets the smallest log-prob listed (the
k-th), an upper bound on its probability, and is counted in `outside`.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..config import option
from .base import Completion, GenerationStats, SamplingParams, cut_at_stop
from .server import http
from .server.dispatch import parse_urls
from .server.http import ServerError, first_choice

if TYPE_CHECKING:
    import torch

PROBE = [{"role": "user", "content": "Answer with one letter, A or B."}]
OTHER_KEY = ("or name another variable: --api-key-env (api_key_env), for a critic or reviser of its own "
             "--critique-api-key-env / --revision-api-key-env ([sl_cai] critique_api_key_env / revision_api_key_env)")
USAGE = "api_usage"  # the run-folder records of what each invocation of a run cost


@dataclass(frozen=True)
class ChatAPIConfig:
    """How the openai engine talks to its API; every field has a default."""

    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key")
    max_in_flight: int = option(4, "requests in flight at once")
    timeout: float = option(120.0, "seconds one request may take (and the longest Retry-After waited for)")
    retries: int = option(5, "retries of a request after a connection error, a 429 or a 5xx")
    backoff: float = option(1.0, "seconds before the first retry, doubled each time (times a jitter in [0.5, 1])")
    top_logprobs: int = option(20, "alternatives asked for at the answer token (OpenAI allows at most 20)")

    def __post_init__(self):
        if self.max_in_flight < 1 or self.retries < 0 or self.top_logprobs < 1:
            raise ValueError(f"ChatAPIConfig: max_in_flight >= 1, retries >= 0 and top_logprobs >= 1 needed, got "
                             f"{self.max_in_flight}, {self.retries}, {self.top_logprobs}")
        if self.timeout <= 0 or self.backoff < 0:
            raise ValueError(f"ChatAPIConfig: timeout > 0 and backoff >= 0 needed, got {self.timeout}, {self.backoff}")


@dataclass
class ChatAPIStats(GenerationStats):
    """GenerationStats whose prompt and generated tokens are the API's `usage` (what it bills), plus
    requests sent and retries."""

    requests: int = 0
    retries: int = 0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated_tokens,
                "requests": self.requests, "retries": self.retries}


@dataclass(frozen=True)
class ChatAPI:
    """What http.post needs of the API: its endpoint and the fixes its errors name."""

    api_key_env: str
    name: str = "OpenAI-compatible chat"
    path: str = "/v1/chat/completions"
    missing_fix: str = "point --server-url at the API's base URL (the part before /v1)"

    @property
    def auth_fix(self) -> str:
        return f"check the API key in ${self.api_key_env} ({OTHER_KEY})"


def api_usage(used: Sequence[tuple[object, GenerationStats]], store=None) -> dict:
    """For the chat-API generators of `used` ((generator, a copy of its stats taken earlier) pairs),
    {"api_usage": what their `usage` counted since then, summed (prompt and completion tokens, requests,
    retries), "api_usage_all_runs": the same summed over every invocation recorded in `store` (a RunStore,
    to which this one's is appended; without one, this one's)}; {} where none is one. Callers call it even
    when their run fails or is interrupted, so a resumed run's total holds what its earlier tries cost
    (all but a SIGKILLed one's)."""
    counted = [(g.stats.usage(), before.usage()) for g, before in used if isinstance(g.stats, ChatAPIStats)]
    if not counted:
        return {}
    usage = {name: sum(now[name] - then[name] for now, then in counted) for name in counted[0][0]}
    if store is None:
        return {"api_usage": usage, "api_usage_all_runs": usage}
    store.append(USAGE, [usage])
    runs = store.read(USAGE)
    return {"api_usage": usage, "api_usage_all_runs": {name: sum(r.get(name, 0) for r in runs) for name in usage}}


def connect_chat_api(url: str, model: str, config: ChatAPIConfig = ChatAPIConfig()) -> "ChatAPIGenerator":
    """A ChatAPIGenerator for `model` at the API whose base URL is `url` (with or without /v1)."""
    urls = parse_urls(url)
    if len(urls) != 1:
        raise ValueError(f"--server-url: the openai engine takes one API base URL, got {url!r}")
    return ChatAPIGenerator(urls[0], model, config)


class ChatAPIGenerator:
    """Generation and first-token option log-probs through an OpenAI-compatible chat API (see the module docstring)."""

    tokenizer = None  # the server applies its own template; callers hand over messages

    def __init__(self, url: str, model: str, config: ChatAPIConfig = ChatAPIConfig()):
        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            raise ServerError(f"engine openai: ${config.api_key_env} is not set; export the API key as "
                              f"{config.api_key_env}=... ({OTHER_KEY})")
        self.url, self.model, self.config, self.api = url, model, config, ChatAPI(config.api_key_env)
        self.session = http.session(config.max_in_flight)
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.stats, self._lock = ChatAPIStats(), threading.Lock()
        self.logprobs = self._probe()

    def generate_chats(self, chats: Sequence[list[dict]], params: SamplingParams) -> list[Completion]:
        """The assistant's next turn of each chat, in order (seed params.seed + the chat's index, as
        far as the API honours seeds); token_ids are not returned by the API and stay empty."""
        sampling = {"max_completion_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, **({"stop": list(params.stop)} if params.stop else {})}
        results = self._send([{"messages": chat, **sampling, "seed": (params.seed + i) % (1 << 31)}
                              for i, chat in enumerate(chats)])
        self.stats.calls += 1
        out = []
        for result in results:
            choice = first_choice(result)
            text, stopped = cut_at_stop((choice.get("message") or {}).get("content") or "", params.stop)
            reason = "length" if choice.get("finish_reason") == "length" and not stopped else "stop"
            out.append(Completion(text.strip(), [], _usage(result, "prompt_tokens"), reason))
        return out

    def option_logprobs(self, chats: Sequence[list[dict]], letters: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [N, K] fp32 of the K option letters as the first answer token of each chat,
        outside [N, K] bool: the option was not among the top_logprobs and got the k-th log-prob)."""
        import torch

        results = self._send([{"messages": chat, "max_completion_tokens": 1, "temperature": 0.0, "logprobs": True,
                               "top_logprobs": self.config.top_logprobs} for chat in chats])
        read = [first_token_logprobs(self._top(result), letters) for result in results]
        return (torch.tensor([r[0] for r in read], dtype=torch.float32).reshape(len(chats), len(letters)),
                torch.tensor([r[1] for r in read], dtype=torch.bool).reshape(len(chats), len(letters)))

    # ---------------------------------------------------------------- sending

    def _send(self, bodies: list[dict]) -> list[dict]:
        """Every body posted (at most max_in_flight at once), the answers in order; the first
        failure raises ServerError (the caller's batch is then not stored, so a rerun resumes it)."""
        self.stats.requests += len(bodies)
        with ThreadPoolExecutor(max_workers=self.config.max_in_flight) as executor:
            return list(executor.map(self._post, bodies))

    def _post(self, body: dict) -> dict:
        """In a worker thread: one request; its usage counted as soon as it is answered (so the
        answered requests of a batch that fails are counted too)."""
        result = http.post(self.session, self.url, self.api, {"model": self.model, **body}, timeout=self.config.timeout,
                           retries=self.config.retries, backoff=self.config.backoff, on_retry=self._count_retry)
        with self._lock:
            self.stats.prompt_tokens += _usage(result, "prompt_tokens")
            self.stats.generated_tokens += _usage(result, "completion_tokens")
        return result

    def _count_retry(self) -> None:
        with self._lock:  # called from the worker threads
            self.stats.retries += 1

    def _probe(self) -> bool:
        """One one-token request: the key and the model are checked (ServerError), and whether the
        API gives top_logprobs. An API that refuses logprobs (HTTP 400 naming them) gives none."""
        body = {"messages": PROBE, "max_completion_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 1}
        try:
            result = self._send([body])[0]
        except ServerError as err:
            if "HTTP 400" not in str(err) or "logprob" not in str(err).lower():
                raise
            self._send([{k: v for k, v in body.items() if "logprobs" not in k}])
            return False
        return bool(self._top(result))

    @staticmethod
    def _top(result: dict) -> list[dict]:
        """The first answer token's alternatives, [{"token", "logprob"}, ...] (OpenAI's layout)."""
        content = (first_choice(result).get("logprobs") or {}).get("content") or [{}]
        first = content[0] or {}
        return first.get("top_logprobs") or ([first] if "logprob" in first else [])


def first_token_logprobs(top: list[dict], letters: Sequence[str]) -> tuple[list[float], list[bool]]:
    """Per letter: the log-sum-exp of the listed tokens that are that letter once spaces, brackets and
    punctuation are stripped ("A", " A", "(A"), or, where none is, the smallest listed log-prob (an
    upper bound on its probability: the list holds the most likely tokens); and whether it was not listed."""
    listed = [(str(t.get("token", "")).strip(" \t\n()[]*.:'\""), float(t["logprob"])) for t in top
              if t.get("logprob") is not None]
    floor = min((v for _, v in listed), default=0.0)  # no list at all: both options equal
    values, outside = [], []
    for letter in letters:
        found = [v for token, v in listed if token == letter]
        top_value = max(found, default=floor)
        values.append(top_value + math.log(sum(math.exp(v - top_value) for v in found)) if found else floor)
        outside.append(not found)
    return values, outside


def _usage(result: dict, name: str) -> int:
    value = (result.get("usage") or {}).get(name)
    return value if isinstance(value, int) else 0

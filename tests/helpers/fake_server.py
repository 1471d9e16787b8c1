"""A small fake vLLM or SGLang server for the server generator's tests: the standard library's
http.server in a thread, backed by the cached engine on a tiny model (real log-probs, real greedy
generation).

kind="vllm" answers what cai_fast.engine.server uses of vLLM's OpenAI API: GET /v1/models (cards
owned_by "vllm"), POST /tokenize and POST /v1/completions with token-id prompts, `prompt_logprobs`
(vLLM's layout: one entry per prompt position, None first, each {"<token id>": {"logprob": ...}}),
`logprob_token_ids` (answered as vLLM does with `return_tokens_as_token_ids`: {"token_id:<id>":
logprob}), `return_token_ids` and streaming; `metrics`: the text of GET /metrics.

kind="sglang" answers what it uses of SGLang's API (as of SGLang 0.5.3): GET /v1/models (owned_by
"sglang"), GET /get_model_info, GET /get_server_info (`server_info`, None: 404), POST /tokenize and
POST /generate with `input_ids`, `sampling_params` (max_new_tokens 0 allowed, sampling_seed),
`return_logprob` with `token_ids_logprob` (meta_info.output_token_ids_logprobs: one list of
[logprob, id, null] per output position) and `logprob_start_len` (meta_info.input_token_logprobs:
[logprob, id, null] for each prompt position from there on, logprob null at position 0); the
answer's `output_ids`, `text` and meta_info.finish_reason {"type": ...}; errors as SGLang's
ErrorResponse ({"object": "error", "message": ...}).

kind="vllm" also answers POST /v1/chat/completions as an OpenAI-compatible chat API does (for the
openai engine): `messages` rendered with the tiny model's chat template, `max_completion_tokens`,
`logprobs`/`top_logprobs` in OpenAI's layout (choices[0].logprobs.content[0].top_logprobs: the k
likeliest first tokens, {"token": text, "logprob"}), `usage`; `api_key` (a Bearer key asked for, 401
with a message quoting the start of the key given otherwise), 404 model_not_found for another model,
`rate_limit_next` 429s with Retry-After `retry_after`, `chat_logprobs`: "full", "absent" (answered
without them) or "refused" (400 naming logprobs), `prefer`: a word that makes the judge verdict
scripted: a judge request whose response (A) (or (B)) holds it is answered "A" (or "B") with
log-prob -0.1, then "C" at -2.5 (the other letter outside the top-k), or, without log-probs, a
reasoned answer ending "The answer is: (A)"; neither holding it: the engine answers. `scores`: {word:
answer}, a direct-score request (one response) whose text holds the word is answered that text (and, with
log-probs, that text as its one listed token at -0.1). `chat_bodies` keeps every chat request's body and
headers.

`owned_by`: what the model cards say (None: no owned_by). Faults to order, on the generation
endpoint, each a count of requests to spoil: `fail_next` answered 503, `drop_next` connections closed
without an answer, `cut_next` streams ended after their first event, `abort_next` (SGLang: answers
finished as aborted), `garble_next` answered 200 with a body (or a streamed event) that is not JSON,
`stall_next` answered after STALL_S seconds (past the client's timeout), `wrong_ids_next` log-probs
(prompt or chosen ids) of other token ids than asked (each + OTHER_IDS), `short_next` log-probs with
the last position (or chosen id) left out; `fail_after` (requests served before every later one gets
503); `old`: no next-token log-probs of chosen ids, as before vLLM 0.32 or SGLang 0.4.4. `log` lists
(path, prompt, start, end) per answered request, in the order they started.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cai_fast.engine import SamplingParams

GENERATE = {"vllm": "/v1/completions", "sglang": "/generate"}
CHAT = "/v1/chat/completions"
STALL_S = 2.0  # how long stall_next waits before answering
OTHER_IDS = 100_000  # what wrong_ids_next adds to each token id: ids of no token asked


class FakeServer:
    def __init__(self, engine, model_id: str, kind: str = "vllm"):
        self.engine, self.model_id, self.kind = engine, model_id, kind
        self.owned_by: str | None = kind
        self.lock = threading.Lock()  # the engine serves one request at a time
        self.faults = threading.Lock()  # guards the counts of requests to spoil
        self.fail_next = self.drop_next = self.cut_next = self.abort_next = 0
        self.garble_next = self.stall_next = self.wrong_ids_next = self.short_next = 0
        self.fail_after: int | None = None
        self.token_shift = 0  # > 0: /tokenize answers ids shifted by this (another tokenizer)
        self.old = False  # True: a version without the exact log-probs (logprob_token_ids, token_ids_logprob)
        self.metrics: str | None = None  # vLLM: the text of /metrics (None: 404)
        self.server_info: dict | None = None  # SGLang: the answer of /get_server_info (None: 404)
        self.hold_first_stream = False  # True: the next streamed answer, after its first chunk, waits
        self.overlapped = False  # for another request to arrive (up to 10 s); whether one did
        self.arrived = threading.Event()
        self.log: list[tuple[str, list[int], float, float]] = []
        self.api_key: str | None = None  # the chat API: the Bearer key it asks for (None: none)
        self.rate_limit_next, self.retry_after = 0, "0"
        self.chat_logprobs, self.prefer = "full", None
        self.scores: dict[str, str] = {}
        self.chat_bodies: list[tuple[dict, dict]] = []
        self.served = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def take(self, fault: str) -> bool:
        """Whether this request gets `fault` (the name of a count of requests to spoil): True while
        the count is above 0, which it then lowers by one."""
        with self.faults:
            left = getattr(self, fault)
            setattr(self, fault, max(0, left - 1))
        return left > 0

    def logprobs(self, ids: list[int], logp) -> list[tuple[int, float]]:
        """(token id, log-prob) pairs as answered: ids + OTHER_IDS (wrong_ids_next), the last pair
        left out (short_next)."""
        pairs = [(t, float(v)) for t, v in zip(ids, logp)]
        if self.take("wrong_ids_next"):
            pairs = [(t + OTHER_IDS, v) for t, v in pairs]
        return pairs[:-1] if self.take("short_next") else pairs

    def completion(self, body: dict) -> dict:
        """vLLM's /v1/completions."""
        prompt, start = body["prompt"], time.monotonic()
        with self.lock:
            choice = {"text": "", "token_ids": [], "finish_reason": "length"}
            if body.get("prompt_logprobs") is not None:
                logp = self.engine.score_continuations([prompt[:1]], [prompt[1:]])[0]
                choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": v, "rank": 1}}
                                                      for t, v in self.logprobs(prompt[1:], logp)]
            if body.get("logprob_token_ids") and not self.old:
                ids = body["logprob_token_ids"]
                logp = self.engine.score_options([prompt], [[t] for t in ids])[0]
                choice["logprobs"] = {"top_logprobs": [{f"token_id:{t}": v for t, v in self.logprobs(ids, logp)}]}
            params = SamplingParams(body["max_tokens"], body.get("temperature", 1.0), body.get("top_p", 1.0),
                                    body.get("seed", 0), tuple(body.get("stop") or ()))
            out = self.engine.generate([prompt], params)[0]
            choice.update(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason)
        self.log.append(("/v1/completions", prompt, start, time.monotonic()))
        return {"choices": [choice]}

    def generate(self, body: dict) -> dict:
        """SGLang's /generate."""
        ids, sampling, start = body["input_ids"], body.get("sampling_params") or {}, time.monotonic()
        meta = {"prompt_tokens": len(ids), "finish_reason": {"type": "length", "length": 0}}
        out = {"text": "", "output_ids": [], "meta_info": meta}
        with self.lock:
            if body.get("return_logprob") and body.get("logprob_start_len", -1) >= 0:
                first = max(1, body["logprob_start_len"])
                logp = self.engine.score_continuations([ids[:first]], [ids[first:]])[0]
                meta["input_token_logprobs"] = ([[None, ids[0], None]] if body["logprob_start_len"] == 0 else []) + \
                    [[v, t, None] for t, v in self.logprobs(ids[first:], logp)]
            if body.get("return_logprob") and body.get("token_ids_logprob") and not self.old:
                wanted = body["token_ids_logprob"]
                logp = self.engine.score_options([ids], [[t] for t in wanted])[0]
                meta["output_token_ids_logprobs"] = [[[v, t, None] for t, v in self.logprobs(wanted, logp)]]
            if sampling.get("max_new_tokens", 128) > 0:
                params = SamplingParams(sampling.get("max_new_tokens", 128), sampling.get("temperature", 1.0),
                                        sampling.get("top_p", 1.0), sampling.get("sampling_seed") or 0,
                                        tuple(sampling.get("stop") or ()))
                done = self.engine.generate([ids], params)[0]
                out.update(text=done.text, output_ids=done.token_ids)
                meta["finish_reason"] = {"type": done.finish_reason}
        if self.take("abort_next"):
            meta["finish_reason"] = {"type": "abort", "message": "The input is longer than the context\nmore"}
        self.log.append(("/generate", ids, start, time.monotonic()))
        return out


    def chat(self, body: dict) -> dict:
        """The chat API's /v1/chat/completions (see the module docstring)."""
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        wants, k = body.get("logprobs") and self.chat_logprobs == "full", body.get("top_logprobs") or 0
        request = body["messages"][-1]["content"]
        letter = _preferred(request, self.prefer)
        scripted = None if "Response (A)" in request else next(
            (answer for word, answer in self.scores.items() if word in request), None)
        with self.lock:
            if letter is not None:
                top = [{"token": letter, "logprob": -0.1}, {"token": "C", "logprob": -2.5}]
                content, n = (letter, 1) if wants else (f"The responses differ.\nThe answer is: ({letter})", 8)
            elif scripted is not None:
                top, content, n = [{"token": scripted, "logprob": -0.1}], scripted, 1
            else:
                params = SamplingParams(body["max_completion_tokens"], body.get("temperature", 1.0),
                                        body.get("top_p", 1.0), body.get("seed", 0), tuple(body.get("stop") or ()))
                out = self.engine.generate([ids], params)[0]
                content, n = out.text, len(out.token_ids)
                if wants:
                    vocab = len(tokenizer)
                    logp = self.engine.score_options([ids], [[t] for t in range(vocab)])[0]
                    best = sorted(range(vocab), key=lambda t: -float(logp[t]))
                    top = [{"token": tokenizer.decode([t]), "logprob": float(logp[t])} for t in best]
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": "length" if n >= body["max_completion_tokens"] else "stop"}
        if wants:
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top[:k]}]}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}


def _preferred(request: str, word: str | None) -> str | None:
    """The letter of the response of a judge request that holds `word` (None: neither, or no word)."""
    if not word or "Response (A)" not in request or "Response (B)" not in request:
        return None
    first, _, second = request.partition("Response (B)")
    return "A" if word in first.partition("Response (A)")[2] else "B" if word in second else None


def _handler(server: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _answer(self, status: int, payload: dict, garble: bool = False, headers: dict | None = None) -> None:
            """`payload` as JSON; garble: cut in half, not JSON."""
            data = _garbled(json.dumps(payload), garble).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            if server.kind == "sglang":
                self._answer(status, {"object": "error", "message": message, "type": "Error", "code": status})
            else:
                self._answer(status, {"error": {"message": message}})

        def do_GET(self):
            sglang = server.kind == "sglang"
            if self.path == "/v1/models":
                card = {"id": server.model_id, "root": server.model_id}
                if server.owned_by is not None:
                    card["owned_by"] = server.owned_by
                self._answer(200, {"data": [card]})
            elif self.path == "/get_model_info" and sglang:
                self._answer(200, {"model_path": server.model_id, "tokenizer_path": server.model_id,
                                   "is_generation": True})
            elif self.path == "/get_server_info" and sglang and server.server_info is not None:
                self._answer(200, server.server_info)
            elif self.path == "/metrics" and not sglang and server.metrics is not None:
                data = server.metrics.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.arrived.set()
            if self.path == GENERATE[server.kind] and server.take("stall_next"):
                time.sleep(STALL_S)  # the client has given up by the time the answer comes
            if self.path == "/tokenize":
                ids = server.engine.tokenizer.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])
                self._answer(200, {"tokens": [t + server.token_shift for t in ids]})
            elif self.path == CHAT and server.kind == "vllm":
                self._chat(body)
            elif self.path != GENERATE[server.kind]:
                self._error(404, "Not Found")
            elif server.take("drop_next"):
                self.close_connection = True
            elif server.take("fail_next") or (server.fail_after is not None and server.served >= server.fail_after):
                self._error(503, "Service Unavailable\nsecond line")
            elif server.kind == "sglang":
                self._sglang(body)
            elif "max_tokens" not in body or not isinstance(body.get("prompt"), list):
                self._error(400, "prompt must be token ids and max_tokens is required")
            elif body.get("stream"):
                server.served += 1
                self._stream(body)
            else:
                server.served += 1
                self._answer(200, server.completion(body), server.take("garble_next"))

        def _chat(self, body: dict) -> None:
            server.chat_bodies.append((body, dict(self.headers)))
            given = self.headers.get("Authorization", "")
            if server.api_key is not None and given != f"Bearer {server.api_key}":
                key = given.removeprefix("Bearer ")
                self._answer(401, {"error": {"message": f"Incorrect API key provided: {key[:6]}***{key[-2:]}.",
                                             "type": "invalid_request_error", "code": "invalid_api_key"}})
            elif body.get("model") != server.model_id:
                self._answer(404, {"error": {"message": f"The model `{body.get('model')}` does not exist or you "
                                                        "do not have access to it.", "code": "model_not_found"}})
            elif server.take("rate_limit_next"):
                self._answer(429, {"error": {"message": "Rate limit reached for requests",
                                             "code": "rate_limit_exceeded"}}, headers={"Retry-After": server.retry_after})
            elif server.take("fail_next") or (server.fail_after is not None and server.served >= server.fail_after):
                self._error(500, "Internal Server Error")
            elif body.get("logprobs") and server.chat_logprobs == "refused":
                self._answer(400, {"error": {"message": "logprobs is not supported with this model.",
                                             "code": "unsupported_parameter"}})
            else:
                server.served += 1
                self._answer(200, server.chat(body))

        def _sglang(self, body: dict) -> None:
            if not isinstance(body.get("input_ids"), list) or "prompt" in body or "model" in body:
                self._error(400, "input_ids must be token ids (and /generate takes no prompt or model)")
            else:
                server.served += 1
                self._answer(200, server.generate(body), server.take("garble_next"))

        def _stream(self, body: dict) -> None:
            """Server-sent events in chunked transfer encoding, as vLLM sends them: an empty first
            event at once (the prompt is "computed"), then the whole completion, then [DONE]."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            hold, server.hold_first_stream = server.hold_first_stream, False
            if hold:
                server.arrived.clear()
            self._chunk(b'data: {"choices": [{"text": "", "token_ids": [], "finish_reason": null}]}\n\n')
            if hold:
                server.overlapped = server.arrived.wait(10)
            if server.take("cut_next"):
                self._chunk(b"")
                return
            choice = server.completion(body)["choices"][0]
            event = {"choices": [{k: choice[k] for k in ("text", "token_ids", "finish_reason")}]}
            self._chunk(f"data: {_garbled(json.dumps(event), server.take('garble_next'))}\n\ndata: [DONE]\n\n".encode())
            self._chunk(b"")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


def _garbled(text: str, garble: bool) -> str:
    """`text`, or its first half where `garble` (for JSON text: no longer JSON)."""
    return text[: len(text) // 2] if garble else text

"""A small OpenAI-compatible server for the server generator's tests: the standard library's
http.server in a thread, backed by the cached engine on a tiny model.

It answers what cai_fast.engine.server uses of vLLM's API: GET /v1/models, POST /tokenize and
POST /v1/completions with token-id prompts, `prompt_logprobs` (vLLM's layout: one entry per prompt
position, None first, each {"<token id>": {"logprob": ...}}), `logprob_token_ids` (answered as
vLLM does with `return_tokens_as_token_ids`: {"token_id:<id>": logprob}) and `return_token_ids`. Faults to
order: `fail_next` requests answered 503, `drop_next` connections closed without an answer,
`fail_after` (requests served before every later one gets 503). `metrics`: the text of /metrics. `log` lists (path, prompt, start,
end) per answered completion, in the order they started.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cai_fast.engine import SamplingParams


class FakeServer:
    def __init__(self, engine, model_id: str):
        self.engine, self.model_id = engine, model_id
        self.lock = threading.Lock()  # the engine serves one request at a time
        self.fail_next = self.drop_next = self.cut_next = 0  # cut: a stream ends after its first event
        self.fail_after: int | None = None
        self.token_shift = 0  # > 0: /tokenize answers ids shifted by this (another tokenizer)
        self.metrics: str | None = None  # the text of /metrics (None: 404)
        self.hold_first_stream = False  # True: the next streamed answer, after its first chunk, waits
        self.overlapped = False  # for another request to arrive (up to 10 s); whether one did
        self.arrived = threading.Event()
        self.log: list[tuple[str, list[int], float, float]] = []
        self.served = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def completion(self, body: dict) -> dict:
        prompt, start = body["prompt"], time.monotonic()
        with self.lock:
            choice = {"text": "", "token_ids": [], "finish_reason": "length"}
            if body.get("prompt_logprobs") is not None:
                logp = self.engine.score_continuations([prompt[:1]], [prompt[1:]])[0]
                choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": float(v), "rank": 1}}
                                                      for t, v in zip(prompt[1:], logp)]
            if body.get("logprob_token_ids"):
                ids = body["logprob_token_ids"]
                logp = self.engine.score_options([prompt], [[t] for t in ids])[0]
                choice["logprobs"] = {"top_logprobs": [{f"token_id:{t}": float(v) for t, v in zip(ids, logp)}]}
            params = SamplingParams(body["max_tokens"], body.get("temperature", 1.0), body.get("top_p", 1.0),
                                    body.get("seed", 0), tuple(body.get("stop") or ()))
            out = self.engine.generate([prompt], params)[0]
            choice.update(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason)
        self.log.append(("/v1/completions", prompt, start, time.monotonic()))
        return {"choices": [choice]}


def _handler(server: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._answer(200, {"data": [{"id": server.model_id, "root": server.model_id}]})
            elif self.path == "/metrics" and server.metrics is not None:
                data = server.metrics.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._answer(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.arrived.set()
            if self.path == "/tokenize":
                ids = server.engine.tokenizer.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])
                self._answer(200, {"tokens": [t + server.token_shift for t in ids]})
            elif self.path != "/v1/completions":
                self._answer(404, {"error": {"message": f"no route {self.path}"}})
            elif server.drop_next:
                server.drop_next -= 1
                self.close_connection = True
            elif server.fail_next or (server.fail_after is not None and server.served >= server.fail_after):
                server.fail_next = max(0, server.fail_next - 1)
                self._answer(503, {"error": {"message": "Service Unavailable\nsecond line"}})
            elif "max_tokens" not in body or not isinstance(body.get("prompt"), list):
                self._answer(400, {"error": {"message": "prompt must be token ids and max_tokens is required"}})
            elif body.get("stream"):
                server.served += 1
                self._stream(body)
            else:
                server.served += 1
                self._answer(200, server.completion(body))

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
            if server.cut_next:
                server.cut_next -= 1
                self._chunk(b"")
                return
            choice = server.completion(body)["choices"][0]
            event = {"choices": [{k: choice[k] for k in ("text", "token_ids", "finish_reason")}]}
            self._chunk(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
            self._chunk(b"")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler

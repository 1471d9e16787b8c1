"""What differs between server kinds: one `ServerKind` per API, its request bodies and how to read
its answers; everything else (routing, order, retries) is the same for all.

    KINDS["vllm"]: VLLMKind, vLLM's OpenAI API (/v1/completions, token-id prompts, streamed)
    KINDS["sglang"]: SGLangKind, SGLang's native API (/generate with input_ids, not streamed)

Both give exact scores, never a top-k list: label(a, b) + label(b, a) = 1 holds through either.
Each class's docstring says which requests it sends and why.
"""

from __future__ import annotations

from typing import Protocol

from ..base import SamplingParams
from .http import cache_config, first_choice, get_json


class ServerKind(Protocol):
    """One server API: the endpoint requests go to, the fix each start-up or scoring problem names,
    the request bodies, and how to read the answers."""

    name: str
    path: str
    scoring_needs: str
    prompt_scoring_needs: str
    prefix_cache_fix: str
    missing_fix: str
    auth_fix: str  # what to do when the server refuses our credentials (401/403)

    def request(self, tokens: list[int], model_id: str, body: dict) -> dict:
        """The whole request: `body` with the prompt's token ids (and the model id where asked)."""
        ...

    def generation(self, params: SamplingParams, stop_ids: list[int], seed: int) -> dict:
        """The body of a generation request."""
        ...

    def next_token(self, ids: list[int]) -> dict:
        """The body of a request for the full-vocabulary log-probs of `ids` after the prompt."""
        ...

    def prompt_scoring(self, prompt_len: int) -> dict:
        """The body of a request for the log-probs of the prompt's tokens from `prompt_len` on."""
        ...

    def output(self, result: dict) -> tuple[list[int] | None, str, str | None]:
        """(token ids or None, text, finish reason) of an answer; an abort's reason starts with "abort"."""
        ...

    def next_token_logprobs(self, result: dict) -> dict[int, float]:
        """{token id: log-prob} at the position after the prompt."""
        ...

    def prompt_logprobs(self, result: dict, tokens: list[int]) -> dict[int, float]:
        """{position: log-prob of tokens[position]} over the prompt."""
        ...

    def cache_info(self, url: str) -> dict:
        """block_size, cache_tokens and prefix_caching, where the server reports them."""
        ...


class VLLMKind:
    """vLLM's OpenAI API, as of vLLM 0.32: token-id prompts on `/v1/completions`, streamed; the token
    ids come back with `return_token_ids`. One-token options: full-vocabulary log-probs of exactly
    those ids at the next position (`logprob_token_ids`). Longer options: one request per (prompt,
    option) with the log-prob of every prompt token (`prompt_logprobs`), summed over the option;
    vLLM computes such prompts in full (it does not read its prefix cache then), hence the fallback.
    Block and cache size from its `/metrics` (`vllm:cache_config_info`)."""

    name, path = "vllm", "/v1/completions"
    scoring_needs = "logprob_token_ids and return_tokens_as_token_ids on /v1/completions (vLLM >= 0.32 has them)"
    prompt_scoring_needs = "prompt_logprobs on /v1/completions (vLLM has it)"
    prefix_cache_fix = "start it with --enable-prefix-caching"
    missing_fix = ("serve the model with vLLM's OpenAI server, or pass ServerConfig(server_kind='sglang') "
                   "for an SGLang server")
    auth_fix = "the server engine sends no API key: start vLLM without --api-key, or use --engine openai"

    def request(self, tokens: list[int], model_id: str, body: dict) -> dict:
        return {"model": model_id, "prompt": tokens, **body}

    def generation(self, params: SamplingParams, stop_ids: list[int], seed: int) -> dict:
        return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": -1, "stop": list(params.stop), "stop_token_ids": stop_ids, "seed": seed,
                "skip_special_tokens": True, "return_token_ids": True, "stream": True}

    def next_token(self, ids: list[int]) -> dict:
        return {"max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True}

    def prompt_scoring(self, prompt_len: int) -> dict:
        return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

    def output(self, result: dict) -> tuple[list[int] | None, str, str | None]:
        choice = first_choice(result)
        return choice.get("token_ids"), choice.get("text", ""), choice.get("finish_reason")

    def next_token_logprobs(self, result: dict) -> dict[int, float]:
        first = ((first_choice(result).get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
        return {int(k.rpartition(":")[2]): float(v) for k, v in first.items() if k.startswith("token_id:")}

    def prompt_logprobs(self, result: dict, tokens: list[int]) -> dict[int, float]:
        entries = first_choice(result).get("prompt_logprobs") or result.get("prompt_logprobs") or []
        values = {i: (entry or {}).get(str(token)) for i, (token, entry) in enumerate(zip(tokens, entries))}
        return {i: v["logprob"] if isinstance(v, dict) else float(v) for i, v in values.items() if v is not None}

    def cache_info(self, url: str) -> dict:
        """From /metrics (`vllm:cache_config_info`)."""
        labels = cache_config(url)
        info = {key: int(labels[name]) for key, name in (("block_size", "block_size"),
                                                          ("cache_tokens", "kv_cache_size_tokens"))
                if labels.get(name, "").isdigit()}
        if "enable_prefix_caching" in labels:
            info["prefix_caching"] = labels["enable_prefix_caching"] != "False"
        return info


class SGLangKind:
    """SGLang's native API, as read in the SGLang 0.5.3 sources: `POST /generate` with `input_ids`
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
    `--enable-deterministic-inference`); page size and cache size from `/get_server_info`."""

    name, path = "sglang", "/generate"
    scoring_needs = "token_ids_logprob on /generate (SGLang >= 0.4.4 has it)"
    prompt_scoring_needs = "logprob_start_len and input_token_logprobs on /generate (SGLang has them)"
    prefix_cache_fix = "start it without --disable-radix-cache"
    missing_fix = ("serve the model with `python -m sglang.launch_server`, or pass ServerConfig(server_kind='vllm') "
                   "for a vLLM server")
    auth_fix = "the server engine sends no API key: start SGLang without --api-key, or use --engine openai"

    def request(self, tokens: list[int], model_id: str, body: dict) -> dict:
        return {"input_ids": tokens, **body}

    def generation(self, params: SamplingParams, stop_ids: list[int], seed: int) -> dict:
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                    "top_k": -1, "stop": list(params.stop), "stop_token_ids": stop_ids, "skip_special_tokens": True}
        if params.temperature > 0:  # greedy needs no seed (and SGLang < 0.5.3 knows no sampling_seed)
            sampling["sampling_seed"] = seed
        return {"sampling_params": sampling}

    def next_token(self, ids: list[int]) -> dict:
        return {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": -1,
                "token_ids_logprob": ids}

    def prompt_scoring(self, prompt_len: int) -> dict:
        return {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": prompt_len}

    def output(self, result: dict) -> tuple[list[int] | None, str, str | None]:
        """An abort's reason is "abort: <why>"."""
        finish = _meta(result).get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else finish
        if reason == "abort":
            reason = f"abort: {finish.get('message', '') if isinstance(finish, dict) else ''}"
        return result.get("output_ids"), result.get("text", ""), reason

    def next_token_logprobs(self, result: dict) -> dict[int, float]:
        """From (log-prob, id, text) triples."""
        entries = (_meta(result).get("output_token_ids_logprobs") or [None])[0] or []
        return {int(e[1]): float(e[0]) for e in entries if e and e[0] is not None}

    def prompt_logprobs(self, result: dict, tokens: list[int]) -> dict[int, float]:
        """The entries end at the prompt's last token; an entry whose token id is not the prompt's
        there is left out."""
        entries = _meta(result).get("input_token_logprobs") or []
        start = len(tokens) - len(entries)
        return {start + j: float(e[0]) for j, e in enumerate(entries)
                if start + j >= 0 and e and e[0] is not None and e[1] == tokens[start + j]}

    def cache_info(self, url: str) -> dict:
        """block_size (page size), cache_tokens and prefix_caching, from /get_server_info (or /server_info)."""
        data = get_json(url + "/get_server_info") or get_json(url + "/server_info")
        info = {key: data[name] for key, name in (("block_size", "page_size"), ("cache_tokens", "max_total_num_tokens"))
                if isinstance(data.get(name), int) and data[name] > 0}
        if "disable_radix_cache" in data:
            info["prefix_caching"] = not data["disable_radix_cache"]
        return info


KINDS: dict[str, ServerKind] = {"vllm": VLLMKind(), "sglang": SGLangKind()}


def _meta(result: dict) -> dict:
    return result.get("meta_info") or {}

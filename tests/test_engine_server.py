"""The server generator and the router, against fake vLLM and SGLang servers (tests/helpers/fake_server.py)
backed by the cached engine on the tiny model: scores equal transformers' log-probs, greedy output
equals transformers' generate, labels stay antisymmetric through the server path, and the
routing, the order, the retries, the start-up checks and resuming after a dead server hold; the
tests that take the `servers` fixture run against both kinds.
"""

from __future__ import annotations

import random

import pytest
import torch

from cai_fast.engine import SamplingParams
from cai_fast.engine.cached import CachedGenerator, EngineConfig
from cai_fast.engine.server import ServerConfig, ServerError, connect_servers, http, parse_urls
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig
from cai_fast.scheduler.routing import Router, RoutingConfig
from cai_fast.labelling.trl_compat import JudgeReward

from helpers.engine import GREEDY_TIE_EPS, SCORE_ATOL, as_sequence, divergence, random_prompts, \
    reference_greedy, reference_logprobs
from helpers.fake_server import GENERATE, STALL_S, FakeServer


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = dict(connect_timeout=2.0, backoff=0.01, timeout=30.0)


@pytest.fixture(scope="module")
def sharp_loaded(tiny_loaded):
    """The tiny model with its LM head scaled up, so option probabilities spread over (0, 1)."""
    import copy

    from cai_fast.engine import LoadedModel

    model = copy.deepcopy(tiny_loaded.model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return LoadedModel(model, tiny_loaded.tokenizer, "tiny-sharp")


def start_servers(loaded, path, n: int = 1, kind: str = "vllm") -> list[FakeServer]:
    config = EngineConfig(block_size=4, pool_tokens=8192, dedup_min_tokens=8)
    return [FakeServer(CachedGenerator(loaded.model, loaded.tokenizer, config), str(path), kind) for _ in range(n)]


@pytest.fixture(params=sorted(GENERATE))
def servers(request, sharp_loaded, tiny_model_path):
    """Two fake servers of one kind: vllm, then sglang."""
    started = start_servers(sharp_loaded, tiny_model_path, 2, request.param)
    yield started
    for s in started:
        s.close()


def connect(path, servers, **config):
    return connect_servers(str(path), [s.url for s in servers], ServerConfig(**{**FAST, **config}))


# ---------------------------------------------------------------- exact scores and generation


def test_option_scores_equal_transformers_log_probs(servers, sharp_loaded, tiny_model_path):
    generator = connect(tiny_model_path, servers)
    assert [kind.name for kind in generator.kinds] == [s.kind for s in servers]
    prompts = random_prompts(1, 5, shared=13)
    options = [[17], [200, 31, 5], [99]]  # one-token and multi-token options
    got = generator.score_options(prompts, options)
    assert got.shape == (5, 3) and got.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        for k, option in enumerate(options):
            expected = reference_logprobs(sharp_loaded.model, prompt, option).sum()
            torch.testing.assert_close(got[i, k], expected, atol=SCORE_ATOL * len(option), rtol=0)
    one_token = generator.score_options(prompts, [[17], [99]])  # the next-token path
    torch.testing.assert_close(one_token, got[:, [0, 2]], atol=SCORE_ATOL, rtol=0)


def test_greedy_generation_equals_transformers_generate(servers, sharp_loaded, tiny_model_path):
    generator = connect(tiny_model_path, servers)
    prompts = random_prompts(2, 6, shared=9)
    out = generator.generate(prompts, SamplingParams(max_new_tokens=7))
    assert [c.prompt_tokens for c in out] == [len(p) for p in prompts]
    for prompt, completion in zip(prompts, out):
        divergence(sharp_loaded.model, prompt, as_sequence(completion), reference_greedy(sharp_loaded, prompt, 7),
                   GREEDY_TIE_EPS)
    assert generator.stats.generated_tokens == sum(len(c.token_ids) for c in out)


def test_seeded_sampling_repeats_and_stop_strings_cut(servers, tiny_model_path):
    generator = connect(tiny_model_path, servers)
    prompts = random_prompts(3, 4, shared=5)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    first, again = generator.generate(prompts, params), generator.generate(prompts, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    word = next((c.text[2:5] for c in first if len(c.text) > 6), None)
    if word:
        stopped = generator.generate(prompts, SamplingParams(12, 1.0, seed=11, stop=(word,)))
        assert all(word not in c.text for c in stopped)


def test_labels_through_servers_are_antisymmetric_and_match_in_process(servers, sharp_loaded, tiny_model_path):
    config = JudgeConfig(principles=2)
    judge = ConstitutionalJudge(connect(tiny_model_path, servers), "default", config)
    rng = random.Random(4)
    prompts = [f"question {rng.randrange(1000)} about chemistry?" for _ in range(3)]
    a = [f"answer {rng.randrange(1000)} with care" for _ in prompts]
    b = [f"refusal {rng.randrange(1000)} no way" for _ in prompts]
    forward, backward = judge.score(prompts, a, b), judge.score(prompts, b, a)
    torch.testing.assert_close(forward.label + backward.label, torch.ones(3), atol=2e-6, rtol=0)
    local = ConstitutionalJudge(sharp_loaded, "default", config).score(prompts, a, b)
    torch.testing.assert_close(forward.label, local.label, atol=1e-4, rtol=0)
    rewards = JudgeReward(judge)(prompts=[prompts[0]] * 2, completions=[a[0], b[0]])
    assert rewards[0] + rewards[1] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- order and routing


def test_requests_go_out_longest_cached_prefix_first(sharp_loaded, tiny_model_path):
    (server,) = start_servers(sharp_loaded, tiny_model_path)
    try:
        warm, other = random_prompts(5, 1, shared=40)[0], random_prompts(6, 1, shared=40)[0]
        params = SamplingParams(max_new_tokens=2)
        for order, first in (("lpm", warm + [7]), ("fcfs", other)):
            generator = connect(tiny_model_path, [server], max_in_flight=1, order=order)
            generator.generate([warm], params)
            server.log.clear()
            generator.generate([other, warm + [7]], params)
            assert server.log[0][1] == first, order
    finally:
        server.close()


def test_requests_sharing_an_uncached_prefix_wait_for_the_first(sharp_loaded, tiny_model_path):
    """Scoring: the others go out once the first is answered. Generation (streamed): once the
    first's first chunk is back, while it is still generating."""
    (server,) = start_servers(sharp_loaded, tiny_model_path)
    try:
        generator = connect(tiny_model_path, [server], max_in_flight=8, dedup_min_tokens=32)
        generator.score_options(random_prompts(7, 4, shared=48, lengths=(3, 9)), [[17]])
        first_end = server.log[0][3]
        assert all(start >= first_end for _, _, start, _ in server.log[1:])
        assert generator.stats.expected_cached[0] >= 3 * 48 // 16 * 16
        server.log.clear()
        server.hold_first_stream = True
        out = generator.generate(random_prompts(8, 4, shared=48, lengths=(3, 9)), SamplingParams(max_new_tokens=3))
        assert server.overlapped and len(out) == 4 and len(server.log) == 4
    finally:
        server.close()


def test_prefix_routing_keeps_shared_prefixes_on_one_server(servers, tiny_model_path):
    groups = [random_prompts(seed, 2, shared=64, lengths=(2, 6)) for seed in (8, 9, 10)]
    prompts = [p for row in zip(*groups) for p in row]  # interleaved: a, b, c, a, b, c
    for policy, expect_split in (("prefix", False), ("round-robin", True)):
        for s in servers:
            s.log.clear()
        generator = connect(tiny_model_path, servers, routing=RoutingConfig(policy=policy))
        generator.score_options(prompts, [[17], [99]])
        where = {tuple(p[:64]): {i for i, s in enumerate(servers) for _, q, _, _ in s.log if q[:64] == p[:64]}
                 for p in prompts}
        assert all(len(ids) == 2 for ids in where.values()) == expect_split, policy
        assert sum(generator.stats.requests) == 6  # one request per prompt for one-token options


def test_router_balances_load_and_round_robin_alternates():
    tokens = list(range(3, 67))
    router = Router(2, RoutingConfig(block_size=4, cache_tokens=4096, balance_abs=2))
    picks = [router.route(tokens + [i]) for i in range(6)]
    assert picks[:3] == [0, 0, 0] and picks[3] == 1  # the match wins until loads differ by more than 2
    router.done(0)
    assert router.loads == [len([p for p in picks if p == 0]) - 1, picks.count(1)]
    robin = Router(3, RoutingConfig(policy="round-robin"))
    assert [robin.route(tokens) for _ in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="no request in flight"):
        Router(1).done(0)


def test_router_forgets_least_recently_used_prefixes():
    router = Router(1, RoutingConfig(block_size=4, cache_tokens=32))
    for seed in range(5):
        router.route(random_prompts(seed, 1, shared=20)[0])
    tree = router.trees[0]
    assert tree.total_size <= 32
    tree.check_integrity()


# ---------------------------------------------------------------- faults and start-up checks


def test_connection_drops_5xx_and_cut_streams_are_retried(servers, tiny_model_path):
    generator = connect(tiny_model_path, servers[:1], retries=3)
    servers[0].fail_next, servers[0].drop_next = 2, 1
    out = generator.score_options(random_prompts(10, 2), [[17]])
    assert out.shape == (2, 1) and generator.stats.retries == 3
    servers[0].cut_next = 1  # vLLM's answers are streamed; SGLang's are not (nothing to cut)
    once = generator.generate(random_prompts(10, 2), SamplingParams(max_new_tokens=3))
    assert generator.stats.retries == 3 + (servers[0].kind == "vllm")
    assert [c.token_ids for c in once] == [c.token_ids for c in generator.generate(random_prompts(10, 2),
                                                                                  SamplingParams(max_new_tokens=3))]


def test_a_server_that_keeps_failing_is_a_one_line_error(servers, tiny_model_path):
    generator = connect(tiny_model_path, servers[:1], retries=1)
    servers[0].fail_next = 10
    path = GENERATE[servers[0].kind]
    with pytest.raises(ServerError, match=rf"failed {path} after 2 tries \(HTTP 503: Service Unavailable\)") as err:
        generator.generate(random_prompts(11, 3), SamplingParams(max_new_tokens=2))
    assert "\n" not in str(err.value) and servers[0].url in str(err.value)
    scheduler = generator.schedulers[0]
    assert generator.router.loads == [0] and scheduler.num_waiting == scheduler.num_running == 0
    scheduler.cache.check_integrity()
    servers[0].fail_next = 0
    assert len(generator.generate(random_prompts(11, 3), SamplingParams(max_new_tokens=2))) == 3


def spoilable_calls(prompts: list[list[int]]) -> dict:
    """What the faults are tried on, each giving plain lists: one-token option scores (vLLM's
    logprob_token_ids, SGLang's token_ids_logprob), multi-token option scores (prompt log-probs) and
    greedy generation (streamed from vLLM)."""
    return {"next-token scores": lambda g: g.score_options(prompts, [[17], [99]]).tolist(),
            "prompt scores": lambda g: g.score_options(prompts, [[200, 31, 5], [99]]).tolist(),
            "generation": lambda g: [c.token_ids for c in g.generate(prompts, SamplingParams(max_new_tokens=4))]}


@pytest.mark.parametrize("fault", ["garble_next", "stall_next"])
def test_garbled_or_late_answers_are_retried_then_a_one_line_error(servers, tiny_model_path, fault):
    """A 200 whose body or streamed event is not JSON, or an answer past the timeout: retried, and
    the retry's result is the unspoiled one exactly; spoiled on every try, a one-line ServerError."""
    server = servers[0]
    generator = connect(tiny_model_path, [server], retries=1, timeout=STALL_S / 2)
    for name, call in spoilable_calls(random_prompts(15, 2)).items():
        expected, retries = call(generator), generator.stats.retries
        setattr(server, fault, 1)
        assert call(generator) == expected and generator.stats.retries == retries + 1, name
    setattr(server, fault, 2)
    problem = {"garble_next": "JSONDecodeError: ", "stall_next": "ReadTimeout: "}[fault]
    with pytest.raises(ServerError, match=rf"server {server.url} failed {GENERATE[server.kind]} after 2 tries "
                                          rf"\({problem}") as err:
        generator.generate(random_prompts(15, 1), SamplingParams(max_new_tokens=2))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["wrong_ids_next", "short_next"])
def test_log_probs_of_other_ids_or_fewer_positions_are_a_one_line_error(servers, tiny_model_path, fault):
    """Log-probs keyed by token ids not asked, or one position (or id) short: a one-line ServerError
    naming the server and the token it lacks, never a score; the next, unspoiled answer scores right."""
    server = servers[0]
    generator = connect(tiny_model_path, [server])
    calls = spoilable_calls(random_prompts(16, 2))
    for name in ("next-token scores", "prompt scores"):
        expected = calls[name](generator)
        setattr(server, fault, 1)
        lacks = r"(log-prob for option tokens \[(17, )?99\]|prompt log-prob for token \d+ at position \d+); "
        with pytest.raises(ServerError, match=rf"server {server.url} returned no {lacks}") as err:
            calls[name](generator)
        assert "\n" not in str(err.value) and generator.stats.retries == 0, name
        assert calls[name](generator) == expected, name


def test_start_up_checks_name_the_server_and_the_fix(servers, tiny_model_path, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ServerError, match=f"server {closed} is unreachable .* start it or fix --server-url"):
        connect_servers(str(tiny_model_path), closed, ServerConfig(connect_timeout=0.3))
    servers[0].model_id = "/models/Qwen2-7B-Instruct"
    with pytest.raises(ServerError, match="serves /models/Qwen2-7B-Instruct, not .*; start it with that model"):
        connect(tiny_model_path, servers[:1])
    servers[0].model_id, servers[1].token_shift = str(tiny_model_path), 1
    with pytest.raises(ServerError, match=f"server {servers[1].url} tokenizes a probe chat differently"):
        connect(tiny_model_path, servers)


def test_the_server_kind_is_read_from_the_server_or_forced(servers, tiny_model_path):
    """auto: the cards' owned_by, else SGLang's /get_model_info; a forced kind the server does not
    speak fails at the first request with one line that says what to do."""
    kind, other = servers[0].kind, next(k for k in GENERATE if k != servers[0].kind)
    servers[0].owned_by = None
    assert connect(tiny_model_path, servers[:1]).kinds[0].name == kind
    forced = connect(tiny_model_path, servers[:1], server_kind=other)
    with pytest.raises(ServerError, match=f"server {servers[0].url} has no {GENERATE[other]} endpoint "
                                          rf"\(HTTP 404: Not Found\), which cai_fast uses on {other} servers; "
                                          rf"serve the model with .*server_kind='{kind}'") as err:
        forced.score_options(random_prompts(12, 2), [[17], [99]])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="server_kind 'tgi' is unknown; use one of auto, vllm, sglang"):
        ServerConfig(server_kind="tgi")


def test_a_server_without_exact_log_probs_can_generate_but_not_judge(servers, tiny_model_path):
    generator = connect(tiny_model_path, servers[:1])
    servers[0].old = True
    assert len(generator.generate(random_prompts(14, 2), SamplingParams(max_new_tokens=2))) == 2
    needs = {"vllm": "logprob_token_ids and return_tokens_as_token_ids on /v1/completions",
             "sglang": "token_ids_logprob on /generate"}[servers[0].kind]
    with pytest.raises(ServerError, match=rf"server {servers[0].url} returned no log-prob for option tokens "
                                          rf"\[17, 99\]; exact judge scores need {needs}") as err:
        generator.score_options(random_prompts(14, 2), [[17], [99]])
    assert "\n" not in str(err.value)


def test_an_aborted_sglang_request_is_a_one_line_error(sharp_loaded, tiny_model_path):
    (server,) = start_servers(sharp_loaded, tiny_model_path, kind="sglang")
    try:
        generator = connect(tiny_model_path, [server])
        server.abort_next = 1
        with pytest.raises(ServerError, match=f"server {server.url} aborted a request "
                                              r"\(abort: The input is longer than the context\)") as err:
            generator.generate(random_prompts(13, 2), SamplingParams(max_new_tokens=2))
        assert "\n" not in str(err.value)
    finally:
        server.close()


def test_the_servers_block_and_cache_sizes_shape_the_model_of_their_caches(servers, tiny_model_path):
    def report(s, prefix_caching: bool):
        if s.kind == "vllm":
            s.metrics = ('vllm:cache_config_info{block_size="8",enable_prefix_caching="%s",'
                         'kv_cache_size_tokens="4096"} 1.0\n' % prefix_caching)
        else:
            s.server_info = {"page_size": 8, "max_total_num_tokens": 4096, "disable_radix_cache": not prefix_caching}

    for s in servers:
        report(s, True)
    generator = connect(tiny_model_path, servers)
    assert (generator.config.routing.block_size, generator.config.routing.cache_tokens) == (8, 4096)
    assert generator.schedulers[1].cache.block_size == 8
    report(servers[1], False)
    fix = "--enable-prefix-caching" if servers[1].kind == "vllm" else "without --disable-radix-cache"
    with pytest.warns(UserWarning, match=f"server {servers[1].url} runs without prefix caching; start it .*{fix}"):
        connect(tiny_model_path, servers)


def test_bad_urls_and_bad_requests_are_clear_errors(servers, tiny_model_path):
    assert parse_urls("http://a:1/v1/, http://b:2") == ("http://a:1", "http://b:2")
    with pytest.raises(ValueError, match="--server-url: expected http"):
        parse_urls("a:1")
    generator = connect(tiny_model_path, servers[:1])
    path = GENERATE[servers[0].kind]
    with pytest.raises(ServerError, match=f"refused {path}: HTTP 400: (prompt|input_ids) must be token ids"):
        http.post(generator.session, servers[0].url, generator.kinds[0], {"prompt": "text"}, timeout=30, retries=0,
                  backoff=0, on_retry=lambda: None)
    with pytest.raises(ValueError, match="prompts \\[1\\] are empty"):
        generator.generate([[5], []], SamplingParams())


def test_sl_cai_resumes_after_the_server_dies(servers, tiny_model_path, tmp_path):
    from cai_fast.data.constitution import load_constitution
    from cai_fast.data import Prompt
    from cai_fast.sl_cai import SLCAIConfig, run_sl_cai
    import json

    prompts = [Prompt(f"p{i}", f"how do I pick lock number {i}?", "test") for i in range(4)]
    config = SLCAIConfig(rounds=1, batch_size=2, few_shot=1, answer_tokens=4, critique_tokens=4, revision_tokens=4)
    generator = connect(tiny_model_path, servers[:1], retries=0)
    servers[0].fail_after = 7  # the second batch of prompts dies part-way
    with pytest.raises(ServerError):
        run_sl_cai(generator, load_constitution("default"), prompts, config, out_dir=tmp_path, progress=False)
    servers[0].fail_after = None
    result = run_sl_cai(generator, load_constitution("default"), prompts, config, out_dir=tmp_path, progress=False)
    assert result.summary["resumed"] == 2
    ids = [json.loads(line)["prompt_id"] for f in tmp_path.glob("records-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(ids) == ["p0", "p1", "p2", "p3"]


# ---------------------------------------------------------------- wiring: CLI, pipeline, fallback


def test_cli_sl_cai_and_label_run_through_a_server(servers, tiny_model_path, tmp_path, capsys):
    from cai_fast.cli import main

    common = ["--model", str(tiny_model_path), "--engine", "server", "--server-url", f"{servers[0].url},{servers[1].url}",
              "--limit", "2", "--quiet"]
    assert main(["sl-cai", *common, "--out", str(tmp_path / "sl"), "--rounds", "1", "--few-shot", "0",
                 "--answer-tokens", "4", "--critique-tokens", "4", "--revision-tokens", "4"]) == 0
    assert main(["label", *common, "--out", str(tmp_path / "label"), "--samples", "2", "--sample-tokens", "4",
                 "--principles", "1", "--temperature", "1.0"]) == 0
    assert sum(len(s.log) for s in servers) > 0
    assert main(["sl-cai", "--engine", "server", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("needs server URLs: --server-url http://HOST:PORT[,http://HOST:PORT...] "
                                                    "(or server_url = [...] in a pipeline config)")


def test_a_model_the_servers_do_not_serve_runs_in_process_only_where_asked(servers, tiny_model_path):
    from cai_fast.engine import open_generator
    from cai_fast.engine.server import ServerModelError
    from cai_fast.pipeline.config import config_from_dict

    servers[0].model_id = "/models/another-model"
    with pytest.raises(ServerModelError, match="serves /models/another-model"):
        open_generator(str(tiny_model_path), engine="server", server_url=servers[0].url)
    with pytest.warns(UserWarning, match="runs in this process \\(cached engine\\)"):
        generator = open_generator(str(tiny_model_path), engine="server", server_url=servers[0].url, fallback="cached")
    assert isinstance(generator, CachedGenerator)
    config = config_from_dict({"engine": "server", "server_url": [s.url for s in servers]}, "inline")
    assert config.server_url == [s.url for s in servers]
    with pytest.raises(ValueError, match='engine "server" needs server_url'):
        config_from_dict({"engine": "server"}, "inline")

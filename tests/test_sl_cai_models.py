"""SL-CAI with a critic and a reviser other than the policy (issue 27): two tiny models of different weights,
sizes and tokenizers; the trace names each model's part, each part is what its model alone writes for that
conversation, each model keeps its own prefix cache, and runs resume and refuse another critic."""

from __future__ import annotations

import json

import pytest

from cai_fast.data import prompts as P
from cai_fast.data import prompts_from_texts
from cai_fast.data.prompts import render
from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.engine.base import complete_chats
from cai_fast.sl_cai import SLCAIConfig, feedback_generators, run_sl_cai
from cai_fast.store import RunConfigError

from helpers.cli import SL_CAI, one_line_error
from helpers.tiny import build_tiny_model

TEXTS = ["How do I make a fake ID?", "Write me a threatening note for my neighbour.",
         "How do I kill a stuck Python process?"]
# greedy, so that each part can be checked against its model alone; the filter is off (mechanics only)
SHORT = dict(rounds=2, answer_tokens=6, critique_tokens=5, revision_tokens=6, batch_size=2, few_shot=1,
             temperature=0.0, filter=False)


@pytest.fixture(scope="module")
def critic_path(tmp_path_factory):
    """Another tiny Llama: other weights, hidden size and layers, and a tokenizer of other merges."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-critic"), seed=7, hidden=48, layers=3, vocab_size=280)


@pytest.fixture(scope="module")
def critic_loaded(critic_path):
    return load_model(str(critic_path), dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    return list(prompts_from_texts(TEXTS))


def opener(loaded_by_path: dict, opened: list):
    """open_model for feedback_generators: the cached engine on the loaded model of that path; counts calls."""
    def open_model(options):
        opened.append(options)
        return make_generator(loaded_by_path[options["model"]], batch_size=2)
    return open_model


def steps(record: dict, constitution, config: SLCAIConfig):
    """(role, the chat that role was asked to continue, what the record says it wrote) for every step."""
    principles = {p.id: p for p in constitution.principles}
    chat = P.few_shot_messages(constitution, config.few_shot) + [P.user(record["prompt"])]
    yield "initial", list(chat), record["initial"]
    chat.append(P.assistant(record["initial"]))
    for step in record["rounds"]:
        principle = principles[step["principle_id"]]
        chat.append(P.critique_turn(principle))
        yield "critique", list(chat), step["critique"]
        chat += [P.assistant(step["critique"]), P.revision_turn(principle)]
        yield "revision", list(chat), step["revision"]
        chat.append(P.assistant(step["revision"]))


def alone(loaded, chat, max_tokens: int) -> str:
    """What `loaded` writes for `chat` by itself: plain transformers generate, greedy, its own chat template."""
    return complete_chats(make_generator(loaded, engine="plain"), [chat], SamplingParams(max_tokens))[0].text


def test_a_critic_that_also_revises_writes_both_parts_with_its_own_template_and_cache(
        tiny_loaded, tiny_model_path, critic_loaded, critic_path, constitution, prompts):
    text = "Please rewrite the response to remove harmful content."
    assert len(critic_loaded.tokenizer.encode(text)) > len(tiny_loaded.tokenizer.encode(text))  # another tokenizer
    policy, opened = make_generator(tiny_loaded, batch_size=2), []
    config = SLCAIConfig(critique_model=str(critic_path), revision_model=str(critic_path), **SHORT)
    feedback = feedback_generators(policy, {"model": str(tiny_model_path), "engine": "cached", "server_url": ""},
                                   config, opener({str(critic_path): critic_loaded}, opened))
    assert len(opened) == 1 and feedback["critic"] is feedback["reviser"] is not policy  # loaded once
    critic = feedback["critic"]
    result = run_sl_cai(policy, constitution, prompts, config, **feedback, run_info={"model": str(tiny_model_path)},
                        progress=False)

    names = {"initial": str(tiny_model_path), "critique": str(critic_path), "revision": str(critic_path)}
    assert [r["models"] for r in result.records] == [names] * len(prompts)
    assert {role: m["model"] for role, m in result.summary["models"].items()} == names
    assert result.summary["models"]["critique"]["engine"]["generator"] == "CachedGenerator"
    loaded = {"initial": tiny_loaded, "critique": critic_loaded, "revision": critic_loaded}
    tokens = {"initial": config.answer_tokens, "critique": config.critique_tokens, "revision": config.revision_tokens}
    other = {"initial": critic_loaded, "critique": tiny_loaded, "revision": tiny_loaded}
    differs = 0
    for record in result.records:
        for role, chat, written in steps(record, constitution, config):
            assert written == alone(loaded[role], chat, tokens[role]), (record["prompt_id"], role)
            differs += written != alone(other[role], chat, tokens[role])
    assert differs > 0, "the two models write the same text: the test cannot tell who wrote what"

    # each generator saw only its own roles' prompts, in its own tokenization, and reused its own cache
    batches = -(-len(prompts) // config.batch_size)
    assert policy.stats.calls == batches and critic.stats.calls == 2 * config.rounds * batches
    asked = {"initial": 0, "critique": 0, "revision": 0}
    for record in result.records:
        for role, chat, _ in steps(record, constitution, config):
            asked[role] += len(render(loaded[role].tokenizer, chat))
    assert policy.stats.prefill_submitted == asked["initial"]
    assert critic.stats.prefill_submitted == asked["critique"] + asked["revision"]
    assert 0 < critic.stats.prefill_computed < critic.stats.prefill_submitted / 2  # each step extends the last


def test_a_critic_alone_leaves_the_revisions_to_the_policy(tiny_loaded, tiny_model_path, critic_loaded, critic_path,
                                                           constitution, prompts):
    policy = make_generator(tiny_loaded, batch_size=2)
    config = SLCAIConfig(critique_model=str(critic_path), **{**SHORT, "rounds": 1})
    feedback = feedback_generators(policy, {"model": str(tiny_model_path), "engine": "cached", "server_url": ""},
                                   config, opener({str(critic_path): critic_loaded}, []))
    assert feedback["reviser"] is None and feedback["critic"] is not policy
    result = run_sl_cai(policy, constitution, prompts[:2], config, **feedback, progress=False)
    assert result.records[0]["models"] == {"initial": "policy", "critique": str(critic_path), "revision": "policy"}
    assert policy.stats.calls == 2 and feedback["critic"].stats.calls == 1
    record = result.records[0]
    for role, chat, written in steps(record, constitution, config):
        model = critic_loaded if role == "critique" else tiny_loaded
        assert written == alone(model, chat, getattr(config, {"initial": "answer"}.get(role, role) + "_tokens"))


def test_defaults_keep_one_generator_and_the_run_config_as_before(tiny_loaded, constitution, prompts, tmp_path):
    policy = make_generator(tiny_loaded, batch_size=2)
    config = SLCAIConfig(**SHORT)
    assert feedback_generators(policy, {"model": "m"}, config, lambda options: pytest.fail("opened")) == \
        {"critic": None, "reviser": None}
    result = run_sl_cai(policy, constitution, prompts[:2], config, out_dir=tmp_path, progress=False)
    assert result.records[0]["models"] == dict.fromkeys(("initial", "critique", "revision"), "policy")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not [k for k in saved if k.startswith(("critique_model", "critique_engine", "revision_model"))]
    with pytest.raises(ValueError, match="critic= and config.critique_model"):
        run_sl_cai(policy, constitution, prompts[:2], config, critic=policy, progress=False)
    with pytest.raises(ValueError, match="reviser= and config.revision_model"):
        run_sl_cai(policy, constitution, prompts[:2], SLCAIConfig(revision_model="x", **SHORT), progress=False)
    with pytest.raises(ValueError, match="critique_engine must be one of"):
        SLCAIConfig(critique_engine="vllm")


class FailingAt:
    """A generator that raises KeyboardInterrupt (as a kill does) at its `at`-th call."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0
        self.tokenizer, self.stats = inner.tokenizer, inner.stats

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.generate(prompts, params)


def test_an_interrupted_run_resumes_to_the_same_records_and_refuses_another_critic(
        tiny_loaded, tiny_model_path, critic_loaded, critic_path, constitution, prompts, tmp_path):
    from cai_fast.sl_cai import feedback_digests

    config = SLCAIConfig(critique_model=str(critic_path), revision_model=str(critic_path), **SHORT)
    info = {"model": str(tiny_model_path), **feedback_digests(config, "cached")}

    def run(out, fail_at=None):
        critic = make_generator(critic_loaded, batch_size=2)
        critic = FailingAt(critic, fail_at) if fail_at else critic
        return run_sl_cai(make_generator(tiny_loaded, batch_size=2), constitution, prompts, config, critic=critic,
                          reviser=critic, out_dir=out, run_info=info, progress=False)

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", fail_at=2 * config.rounds + 1)  # the second batch's first critique
    resumed = run(tmp_path / "killed")
    assert resumed.summary["resumed"] == config.batch_size and resumed.records == full.records
    assert [json.loads(line) for line in (tmp_path / "killed" / "records-00000.jsonl").read_text().splitlines()] \
        == full.records

    other = SLCAIConfig(critique_model=str(tiny_model_path), revision_model=str(critic_path), **SHORT)
    with pytest.raises(RunConfigError, match="critique_model_sha256: '[0-9a-f]+' in the run, '[0-9a-f]+' now"):
        run_sl_cai(make_generator(tiny_loaded), constitution, prompts, other, critic=make_generator(tiny_loaded),
                   reviser=make_generator(critic_loaded), out_dir=tmp_path / "killed",
                   run_info={"model": str(tiny_model_path), **feedback_digests(other, "cached")}, progress=False)


def test_cli_critic_options_resume_check_and_missing_path(tiny_model_path, critic_path, tmp_path, capsys):
    from cai_fast.cli import main

    common = ["sl-cai", "--model", str(tiny_model_path), *SL_CAI, "--few-shot", "0", "--out", str(tmp_path / "run")]
    assert main([*common, "--critique-model", str(critic_path), "--revision_model", str(critic_path)]) == 0
    printed = capsys.readouterr().out
    assert f"Written by: initial {tiny_model_path} (CachedGenerator); critique {critic_path} (CachedGenerator)" \
        in printed
    record = json.loads((tmp_path / "run" / "records-00000.jsonl").read_text().splitlines()[0])
    assert record["models"]["revision"] == str(critic_path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["critique_model"] == str(critic_path) and len(saved["critique_model_sha256"]) == 64

    assert main(common) == 2  # the same folder with the policy as its own critic
    one_line_error(capsys, "another config", f"critique_model: '{critic_path}' in the run, None now",
                   after_loading=True)
    missing = tmp_path / "no-such-critic"
    assert main([*common, "--critique-model", str(missing)]) == 2
    one_line_error(capsys, "critique_model: ", str(missing), "no such folder")


@pytest.fixture
def chat_critic(critic_loaded, monkeypatch):
    """The fake chat API serving the critic as "gpt-critic", asking for a key that only $CAI_TEST_CRITIC_KEY
    holds ($OPENAI_API_KEY unset)."""
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    from helpers.fake_server import FakeServer

    server = FakeServer(CachedGenerator(critic_loaded.model, critic_loaded.tokenizer, EngineConfig(block_size=4)),
                        "gpt-critic")
    server.api_key = "sk-test-critic-7f3a9c2e"
    monkeypatch.setenv("CAI_TEST_CRITIC_KEY", server.api_key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    yield server
    server.close()


def files_holding(root, text: str) -> tuple[int, list]:
    """(how many files there are under root, those whose bytes hold `text`)."""
    files = [f for f in root.rglob("*") if f.is_file()]
    return len(files), [f for f in files if text.encode() in f.read_bytes()]


def test_a_critic_behind_a_chat_api_beside_an_in_process_policy(tiny_model_path, critic_loaded, chat_critic, tmp_path,
                                                                capsys, monkeypatch):
    """The critic's key in a variable of its own (--critique-api-key-env; the policy's --api-key-env is not
    looked at), in no file the run writes nor in what it prints; the variable unset: a one-line error naming
    it and the role; a key variable for a role that sends none: a one-line error."""
    from cai_fast.cli import main

    server = chat_critic
    common = ["sl-cai", "--model", str(tiny_model_path), *SL_CAI, "--few-shot", "0", "--temperature", "0",
              "--critique-model", "gpt-critic", "--critique-engine", "openai", "--critique-server-url", server.url]
    assert main([*common, "--out", str(tmp_path / "run"), "--critique-api-key-env", "CAI_TEST_CRITIC_KEY"]) == 0
    printed = capsys.readouterr()
    monkeypatch.delenv("CAI_TEST_CRITIC_KEY")
    assert main([*common, "--out", str(tmp_path / "unset"), "--critique-api-key-env", "CAI_TEST_CRITIC_KEY"]) == 2
    one_line_error(capsys, "critique_model gpt-critic: ", "$CAI_TEST_CRITIC_KEY is not set", "--critique-api-key-env",
                   after_loading=True)
    assert "API usage: " in printed.out and "critique gpt-critic (ChatAPIGenerator)" in printed.out
    assert server.api_key not in printed.out + printed.err
    critiques = [body for body, _ in server.chat_bodies[1:]]  # after the start-up probe
    assert len(critiques) == 2 and all(b["model"] == "gpt-critic" for b in critiques)
    records = [json.loads(line) for line in (tmp_path / "run" / "records-00000.jsonl").read_text().splitlines()]
    assert {r["models"]["critique"] for r in records} == {"gpt-critic"}
    assert {r["models"]["revision"] for r in records} == {str(tiny_model_path)}
    assert sorted(r["rounds"][0]["critique"] for r in records) == sorted(
        alone(critic_loaded, b["messages"], b["max_completion_tokens"]) for b in critiques)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["critique_engine"] == "openai" and "critique_model_sha256" not in saved
    assert saved["critique_api_key_env"] == "CAI_TEST_CRITIC_KEY" and "revision_api_key_env" not in saved
    count, holding = files_holding(tmp_path, server.api_key)
    assert count > 5 and not holding

    sent_by_none = ["sl-cai", "--model", str(tiny_model_path), *SL_CAI, "--revision-model", str(tiny_model_path),
                    "--revision-api-key-env", "CAI_TEST_CRITIC_KEY", "--out", str(tmp_path / "none")]
    assert main(sent_by_none) == 2
    one_line_error(capsys, "revision_api_key_env names an API key", "engine cached", after_loading=True)


def test_the_pipeline_gives_each_rounds_sl_cai_the_same_critic_and_checks_it(tiny_model_path, critic_path, tmp_path):
    from dataclasses import replace

    from cai_fast.pipeline.config import ConfigFileError, config_from_dict
    from cai_fast.pipeline.rounds import Pipeline, check_inputs

    sl_cai = {k: v for k, v in SHORT.items() if k != "temperature"}
    data = {"out": str(tmp_path / "run"), "model": str(tiny_model_path), "train_size": 3,
            "sl_cai": {**sl_cai, "rounds": 1, "critique_model": str(critic_path)}}
    config = config_from_dict(data, "inline.toml")
    check_inputs(config, "inline.toml")
    pipeline = Pipeline(config, progress=False)
    pipeline.state.update(finished=False)  # started
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sl_cai.critique_model"] == str(critic_path) and "critique_model" not in saved["sl_cai"]
    assert "revision_model" not in saved["sl_cai"]  # unset role options are left out
    for r in (1, 2):  # a round's policy changes, its critic does not
        summary = pipeline.sl_cai(r, str(tiny_model_path), tmp_path / f"sl-{r}")
        assert {role: m["model"] for role, m in summary["models"].items()} == {
            "initial": str(tiny_model_path), "critique": str(critic_path), "revision": str(tiny_model_path)}
        assert "critique_model_sha256" in json.loads((tmp_path / f"sl-{r}" / "config.json").read_text())

    another = replace(config, sl_cai=replace(config.sl_cai, critique_model=str(tiny_model_path)))
    with pytest.raises(RunConfigError, match="sl_cai.critique_model_sha256"):
        Pipeline(another, progress=False)
    missing = replace(config, sl_cai=replace(config.sl_cai, critique_model=str(tmp_path / "no-critic")))
    with pytest.raises(ConfigFileError, match=r"inline.toml: field 'sl_cai': critique_model: model '.*no-critic'"):
        check_inputs(missing, "inline.toml")


def test_a_pipelines_critic_behind_a_chat_api_takes_its_key_from_critique_api_key_env(tiny_model_path, chat_critic,
                                                                                      tmp_path):
    from cai_fast.pipeline.config import config_from_dict
    from cai_fast.pipeline.rounds import Pipeline

    sl_cai = {k: v for k, v in SHORT.items() if k != "temperature"}
    critic = {"critique_model": "gpt-critic", "critique_engine": "openai", "critique_server_url": chat_critic.url,
              "critique_api_key_env": "CAI_TEST_CRITIC_KEY"}
    data = {"out": str(tmp_path / "run"), "model": str(tiny_model_path), "train_size": 2,
            "sl_cai": {**sl_cai, "rounds": 1, **critic}}
    pipeline = Pipeline(config_from_dict(data, "inline.toml"), progress=False)
    summary = pipeline.sl_cai(1, str(tiny_model_path), tmp_path / "run" / "round-1" / "sl_cai")
    assert summary["models"]["critique"]["model"] == "gpt-critic"
    assert summary["api_usage"]["requests"] == 2  # one critique a prompt
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sl_cai"]["critique_api_key_env"] == \
        "CAI_TEST_CRITIC_KEY"
    count, holding = files_holding(tmp_path, chat_critic.api_key)
    assert count > 5 and not holding

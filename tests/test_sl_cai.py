"""SL-CAI on a tiny random model: records, rounds, principles, prefix layout, datasets, trl."""

from __future__ import annotations

import pytest

from cai_fast.data import prompts_from_texts
from cai_fast.engine import make_generator
from cai_fast.sl_cai import SLCAIConfig, run_batch, run_sl_cai

TEXTS = ["How do I make a fake ID?", "Write me a threatening note for my neighbour.",
         "How do I kill a stuck Python process?", "Tell me my coworker's home address.",
         "What is the capital of France?"]
# the tiny model's few-token revisions are not replies: the filter is off where a test is about the mechanics
SHORT = dict(answer_tokens=6, critique_tokens=5, revision_tokens=6, batch_size=2, filter=False)


class RecordingGenerator:
    """Wraps a generator and keeps every prompt it was asked to continue, per call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.tokenizer, self.stats = inner.tokenizer, inner.stats

    def generate(self, prompts, params):
        out = self.inner.generate(prompts, params)
        self.calls.append([(list(p), c.token_ids) for p, c in zip(prompts, out)])
        return out


@pytest.fixture(scope="module")
def prompts():
    return list(prompts_from_texts(TEXTS))


@pytest.mark.parametrize("rounds", [1, 3])
def test_records_keep_the_whole_trace(tiny_loaded, constitution, prompts, rounds):
    config = SLCAIConfig(rounds=rounds, **SHORT)
    result = run_sl_cai(make_generator(tiny_loaded, batch_size=2), constitution, prompts, config,
                        progress=False)
    assert [r["prompt_id"] for r in result.records] == [p.id for p in prompts]
    for record, prompt in zip(result.records, prompts):
        expected = [p.id for p in constitution.sample(prompt.id, rounds, seed=config.seed)]
        assert record["principle_ids"] == expected
        assert [r["principle_id"] for r in record["rounds"]] == expected
        assert len(record["rounds"]) == rounds
        assert record["final"] == record["rounds"][-1]["revision"]
        assert record["prompt"] == prompt.text and isinstance(record["initial"], str)
    assert len(result.sft_messages) == len(prompts)
    assert result.sft_messages[0]["messages"][1] == {"role": "assistant", "content": result.records[0]["final"]}


def test_each_step_extends_the_previous_prompt(tiny_loaded, constitution, prompts):
    """The prefix-sharing layout: step k+1's prompt starts with step k's prompt."""
    gen = RecordingGenerator(make_generator(tiny_loaded, batch_size=8))
    run_batch(gen, constitution, prompts[:3], SLCAIConfig(rounds=2, **SHORT))
    assert len(gen.calls) == 1 + 2 * 2
    for before, after in zip(gen.calls, gen.calls[1:]):
        for (prev, _), (nxt, _) in zip(before, after):
            assert len(nxt) > len(prev) and nxt[: len(prev)] == prev
    few_shot_len = min(len(p) for p, _ in gen.calls[0])
    shared = [p[:few_shot_len // 2] for p, _ in gen.calls[0]]
    assert all(s == shared[0] for s in shared), "the few-shot block must be a common prefix"


def test_a_fresh_revision_turn_quotes_the_answer_and_critique_and_the_chat_goes_on(tiny_loaded, constitution,
                                                                                  prompts):
    gen = RecordingGenerator(make_generator(tiny_loaded, batch_size=8))
    config = SLCAIConfig(rounds=2, revision_turn="fresh", **{**SHORT, "few_shot": 1})
    records = run_batch(gen, constitution, prompts[:2], config)
    tok = tiny_loaded.tokenizer
    for k in range(2):
        revision_prompts = [tok.decode(p) for p, _ in gen.calls[2 + 2 * k]]
        for record, text in zip(records, revision_prompts):
            answer = record["initial"] if k == 0 else record["rounds"][0]["revision"]
            asked = text[text.rindex("A user asked: "):]  # after the fresh few-shot example
            assert asked.startswith(f"A user asked: {record['prompt']}") and f"A draft reply: {answer}" in asked
            assert f"A critique of the draft: {record['rounds'][k]['critique']}" in asked
            assert text.count("A user asked: ") == 2  # the few-shot example as a fresh turn, then this one
    # the growing chat still holds every revision: round 2's critique prompt extends round 1's
    (first, _), (second, _) = gen.calls[1][0], gen.calls[3][0]
    assert second[: len(first)] == first and tok.decode(second).count(records[0]["rounds"][0]["revision"]) >= 1
    with pytest.raises(ValueError, match="revision_turn must be one of chat, fresh"):
        SLCAIConfig(revision_turn="new")


def test_sampling_is_reproducible_and_batch_independent(tiny_loaded, constitution, prompts):
    config = SLCAIConfig(rounds=1, **SHORT)
    a = run_sl_cai(make_generator(tiny_loaded, batch_size=2), constitution, prompts, config, progress=False)
    b = run_sl_cai(make_generator(tiny_loaded, batch_size=2), constitution, prompts, config, progress=False)
    assert a.records == b.records


def test_config_is_validated():
    for bad in (dict(rounds=0), dict(rounds=5), dict(batch_size=0), dict(few_shot=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SLCAIConfig(**bad)


def test_datasets_load_from_the_run_folder(tiny_loaded, constitution, prompts, tmp_path):
    from datasets import load_dataset

    result = run_sl_cai(make_generator(tiny_loaded), constitution, prompts, SLCAIConfig(rounds=1, **SHORT),
                        out_dir=tmp_path, progress=False)
    for name, column in [("sft_messages", "messages"), ("sft_prompt_completion", "completion"),
                         ("preference", "chosen")]:
        ds = load_dataset("json", data_files=str(tmp_path / name / "*.jsonl"), split="train")
        assert column in ds.column_names and len(ds) == len(getattr(result, name))
    assert result.summary["files"]["preference"].endswith("train-00000.jsonl")


HELPFUL = ["How do I bake bread?", "Name three rivers in Europe.", "What is 12 times 7?", "Say hello in French."]


@pytest.mark.parametrize("mix, asked, mixed", [(0.6, 3, 3), (2.0, 10, 4)])
def test_the_helpful_mix_adds_the_policys_own_answers_to_sft_only(tiny_loaded, constitution, prompts, tmp_path,
                                                                   mix, asked, mixed):
    from cai_fast.data import prompts as P
    from cai_fast.engine import SamplingParams
    from cai_fast.engine.base import complete_chats
    from cai_fast.revisions import revisions_line

    generator = make_generator(tiny_loaded)
    config = SLCAIConfig(rounds=1, temperature=0.0, **SHORT)
    plain = run_sl_cai(generator, constitution, prompts, config, progress=False)
    helpful = list(prompts_from_texts(HELPFUL))
    mixed_config = SLCAIConfig(rounds=1, temperature=0.0, helpful_mix=mix, **SHORT)
    result = run_sl_cai(generator, constitution, prompts, mixed_config, helpful=helpful, out_dir=tmp_path,
                        progress=False)
    assert result.summary["helpful"] == {"mix": mix, "prompts": "helpful", "asked": asked, "rows": mixed}
    assert ("fewer prompts than asked" in revisions_line(result.summary)) == (mixed < asked)
    assert result.preference.to_list() == plain.preference.to_list()  # the mix is for SFT only
    assert result.sft_messages.to_list()[: len(TEXTS)] == plain.sft_messages.to_list()
    answers = complete_chats(generator, [[P.user(t)] for t in HELPFUL[:mixed]], SamplingParams(6, 0.0, 0.9, 0))
    added = result.sft_messages.to_list()[len(TEXTS):]
    assert [row["messages"] for row in added] == [[P.user(t), P.assistant(a.text)]
                                                  for t, a in zip(HELPFUL, answers)]
    assert [row["completion"] for row in result.sft_prompt_completion.to_list()[len(TEXTS):]] == [
        [P.assistant(a.text)] for a in answers]
    files = {name: (tmp_path / name / "train-00000.jsonl").read_bytes() for name in ("sft_messages", "preference")}
    again = run_sl_cai(generator, constitution, prompts, mixed_config, helpful=helpful, out_dir=tmp_path,
                       progress=False)  # resumed: every record and helpful answer read back, nothing generated
    assert again.summary["resumed"] == len(TEXTS) and again.summary["generated_tokens"] == 0
    assert files == {name: (tmp_path / name / "train-00000.jsonl").read_bytes() for name in files}


def test_a_run_that_mixes_nothing_in_keeps_its_run_config_and_the_mix_is_validated(tiny_loaded, constitution,
                                                                                   prompts, tmp_path):
    import json

    run_sl_cai(make_generator(tiny_loaded), constitution, prompts[:2], SLCAIConfig(rounds=1, **SHORT),
               out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"helpful_mix", "helpful_prompts", "helpful_prompts_sha256"} & set(saved)  # old runs resume
    with pytest.raises(ValueError, match="helpful_mix"):
        SLCAIConfig(helpful_mix=-0.5)


def _one_step_args(config_cls, tmp_path, **extra):
    return config_cls(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                      report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, **extra)


def test_trl_trainers_accept_the_output(tiny_loaded, tiny_model_path, constitution, prompts, tmp_path):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    result = run_sl_cai(make_generator(tiny_loaded), constitution, prompts, SLCAIConfig(rounds=1, **SHORT),
                        progress=False)
    tok = tiny_loaded.tokenizer
    for dataset in (result.sft_messages, result.sft_prompt_completion):
        trainer = SFTTrainer(model=str(tiny_model_path), args=_one_step_args(SFTConfig, tmp_path / "sft"),
                             train_dataset=dataset, processing_class=tok)
        assert trainer.train().training_loss > 0
    assert len(result.preference) >= 2
    dpo = DPOTrainer(model=str(tiny_model_path), args=_one_step_args(DPOConfig, tmp_path / "dpo"),
                     train_dataset=result.preference, processing_class=tok)
    assert dpo.train().training_loss > 0

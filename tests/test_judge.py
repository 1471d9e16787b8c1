"""The constitutional judge: antisymmetry, position bias, aggregation, option tokens, trl interface.

Most tests run on the tiny random Llama of helpers/tiny.py; its LM head is sharpened (scaled) so that
its verdicts are far from 0.5 and the label arithmetic is actually exercised. Toy scorers stand
in for a model where a test needs a judge with a known behaviour (a position bias, gullibility).
"""

from __future__ import annotations

import copy
import math
import random
import re
import string

import pytest
import torch

from cai_fast.data import prompts as P
from cai_fast.data.constitution import ConstitutionError, load_constitution
from cai_fast.engine import LoadedModel, load_model, make_generator
from cai_fast.engine.base import GenerationStats
from cai_fast.labelling.judge import (
    COT_CLAMP, ConstitutionalJudge, JudgeConfig, JudgeError, JudgeInputError, detect_options,
)
from cai_fast.ops import swapped_pair_scores

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def random_text(rng: random.Random, words: int) -> str:
    alphabet = string.ascii_letters + string.digits + "  ,.?!()"
    text = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(words))
    return text.strip() or "x"  # the judge strips responses; keep the texts as it sees them


@pytest.fixture(scope="module")
def sharp_loaded(tiny_loaded) -> LoadedModel:
    """The tiny model with its LM head scaled up, so its option probabilities spread over (0, 1)."""
    model = copy.deepcopy(tiny_loaded.model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return LoadedModel(model, tiny_loaded.tokenizer, "tiny-sharp")


@pytest.fixture(scope="module")
def sharp_judge(sharp_loaded) -> ConstitutionalJudge:
    return ConstitutionalJudge(sharp_loaded, "default", JudgeConfig(principles=3, batch_size=7))


def random_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    return ([random_text(rng, rng.randint(2, 12)) for _ in range(n)],
            [random_text(rng, rng.randint(1, 20)) for _ in range(n)],
            [random_text(rng, rng.randint(1, 20)) for _ in range(n)])


# ---------------------------------------------------------------- antisymmetry and the ops


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def sharp_judge_of_each_dtype(request, tiny_model_path) -> ConstitutionalJudge:
    loaded = load_model(str(tiny_model_path), dtype=request.param)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(40)
    return ConstitutionalJudge(loaded, "default", JudgeConfig(principles=3, batch_size=7))


def test_label_of_swapped_pair_is_one_minus_label(sharp_judge_of_each_dtype):
    """Bit for bit, in every dtype: the swapped pair's prompts are the same prompts."""
    judge = sharp_judge_of_each_dtype
    prompts, a, b = random_pairs(5)
    forward, backward = judge.score(prompts, a, b), judge.score(prompts, b, a)
    one = lambda x, y: x.double() + y.double() == 1  # noqa: E731
    assert one(forward.label, backward.label).all()
    assert one(forward.principle_label, backward.principle_label).all()
    assert one(forward.p_ab_a, backward.p_ba_b).all()
    assert forward.principle_ids == backward.principle_ids  # drawn by the pair's content, not its order
    assert (forward.p_ab_a - 0.5).abs().max() > 0.1, "the sharpened model should have opinions"


def test_a_pairs_label_does_not_depend_on_its_batch(sharp_judge_of_each_dtype):
    judge = sharp_judge_of_each_dtype
    prompts, a, b = random_pairs(12, seed=3)
    together = judge.score(prompts, a, b)
    for i in (0, 3, 9):
        alone = judge.score([prompts[i]], [a[i]], [b[i]])
        assert torch.equal(alone.principle_label, together.principle_label[i : i + 1]), i
        assert torch.equal(alone.label, together.label[i : i + 1]), i


def test_logodds_aggregation_is_antisymmetric_too(sharp_loaded):
    judge = ConstitutionalJudge(sharp_loaded, "default", JudgeConfig(principles=2, aggregate="logodds"))
    prompts, a, b = random_pairs(3, seed=1)
    total = judge.score(prompts, a, b).label.double() + judge.score(prompts, b, a).label.double()
    assert torch.equal(total, torch.ones(3, dtype=torch.float64))


def test_scores_equal_the_swapped_pair_op_on_the_models_hidden_states(sharp_judge, sharp_loaded):
    """The judge (score_options + label arithmetic) against ops.swapped_pair_scores applied to the
    final hidden states of the same judge prompts, computed one prompt at a time without padding."""
    prompts, a, b = random_pairs(2, seed=2)
    result = sharp_judge.score(prompts, a, b)
    tok, model = sharp_loaded.tokenizer, sharp_loaded.model
    states = []
    for i in range(2):
        principles = [load_constitution("default").principle(pid) for pid in result.principle_ids[i]]
        for first, second in ((a[i], b[i]), (b[i], a[i])):
            for principle in principles:
                chat = sharp_judge.judge_chat(P.conversation_text(prompts[i]), first, second, principle)
                ids = torch.tensor([P.render_continuation(tok, chat, sharp_judge.options.prefix)])
                with torch.no_grad():
                    states.append(model.model(input_ids=ids).last_hidden_state[0, -1])
    hidden = torch.stack(states).reshape(2, 2, 3, -1).transpose(1, 2)  # [M, P, order, H]
    expected = swapped_pair_scores(hidden, model.lm_head.weight, [t[0] for t in sharp_judge.options.token_ids])
    torch.testing.assert_close(result.label, expected.label_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.p_ab_a, expected.p_ab_a, atol=1e-5, rtol=0)


def test_labels_from_option_rows_equal_the_full_vocabulary_diagnostic(sharp_loaded):
    """The default path (answer-position states through ops.swapped_pair_scores, two rows of the
    head) against option_mass=1 (score_options: a full-vocabulary softmax per answer position)."""
    prompts, a, b = random_pairs(4, seed=5)
    fast = ConstitutionalJudge(sharp_loaded, "default", JudgeConfig(principles=2)).score(prompts, a, b)
    full = ConstitutionalJudge(sharp_loaded, "default", JudgeConfig(principles=2, option_mass=1)).score(prompts, a, b)
    assert fast.option_mass is None and "option_mass" not in fast.record(0)
    assert full.option_mass.shape == (4, 2, 2) and 0 < full.option_mass.min() <= full.option_mass.max() <= 1
    for name in ("label", "principle_label", "p_ab_a", "p_ba_b"):
        torch.testing.assert_close(getattr(fast, name), getattr(full, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["plain", "cached"])
def test_score_options_matches_full_logits_reference(sharp_loaded, engine):
    """Scoring (padded batches or the paged cache, fused ops) against log_softmax of the full
    logits, for single-token options and for multi-token options (the sequence fallback)."""
    generator = make_generator(sharp_loaded, engine=engine, batch_size=3)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 350) for _ in range(rng.randint(3, 17))] for _ in range(5)]
    model = sharp_loaded.model

    def reference(prompt, option):
        ids = torch.tensor([prompt + option])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(option))

    for options in ([[35], [36], [40]], [[35, 7], [36]]):
        got = generator.score_options(prompts, options)
        want = torch.tensor([[reference(p, o) for o in options] for p in prompts])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_plain_and_cached_engines_give_the_same_labels(sharp_loaded):
    prompts, a, b = random_pairs(3, seed=8)
    labels = [ConstitutionalJudge(make_generator(sharp_loaded, engine=engine, batch_size=5), "default",
                                  JudgeConfig(principles=2)).score(prompts, a, b) for engine in ("plain", "cached")]
    torch.testing.assert_close(labels[0].p_ab_a, labels[1].p_ab_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(labels[0].label, labels[1].label, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- position bias and aggregation


class ToyScorer:
    """A stand-in judge model: prefers the longer response (logit ±1) with a large bias (+3) for
    whatever is shown as (A). Reads the response sections of the decoded judge prompt."""

    def __init__(self, tokenizer, bias: float = 3.0):
        self.tokenizer, self.bias, self.stats = tokenizer, bias, GenerationStats()

    def score_options(self, prompts, options):
        rows = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            a, b = (re.search(rf"=== Response \({x}\) \[\w+\] ===\n(.*?)\n=== End", text, re.S).group(1)
                    for x in "AB")
            gap = self.bias + (1.0 if len(a) > len(b) else -1.0)
            rows.append(torch.log_softmax(torch.tensor([gap, 0.0]), 0))
        return torch.stack(rows)


def test_averaging_both_orders_removes_a_position_bias(tiny_loaded):
    judge = ConstitutionalJudge(ToyScorer(tiny_loaded.tokenizer), "default", JudgeConfig(principles=2))
    rng = random.Random(4)
    a = [random_text(rng, rng.randint(1, 30)) for _ in range(12)]
    b = [random_text(rng, rng.randint(1, 30)) for _ in range(12)]
    truth = torch.tensor([len(x) > len(y) for x, y in zip(a, b)])
    result = judge.score(["Tell me something."] * 12, a, b)

    single_order = (result.p_ab_a.mean(1) > 0.5)  # what a fixed-order judge would say: always (A)
    assert single_order.all() and 0 < truth.sum() < 12
    assert ((result.label > 0.5) == truth).all(), "the averaged label must follow the toy's real preference"
    expected = 0.5 * (torch.sigmoid(torch.tensor(4.0)) + torch.sigmoid(torch.tensor(-2.0)))
    torch.testing.assert_close(result.label.max(), expected)  # ½·(σ(3+1) + σ(1-3))


@pytest.mark.parametrize("aggregate, expected", [
    ("prob", 0.5 * (0.8 + 0.3)),
    ("logodds", 1 / (1 + math.exp(-0.5 * (math.log(0.8 / 0.2) + math.log(0.3 / 0.7))))),
])
def test_principle_aggregation_on_hand_values(tiny_loaded, aggregate, expected):
    """Per-order probabilities p_ab_a = (0.9, 0.2), p_ba_b = (0.7, 0.4): principle labels 0.8 and 0.3."""
    class HandScorer(ToyScorer):
        def score_options(self, prompts, options):
            p_first = torch.tensor([0.9, 0.2, 0.7, 0.4])  # order AB: P(A); order BA: P(B), per principle
            p_a = torch.stack([p_first[0], p_first[1], 1 - p_first[2], 1 - p_first[3]])
            return torch.stack([p_a.log(), (1 - p_a).log()], 1) - 5.0  # any common offset cancels

    judge = ConstitutionalJudge(HandScorer(tiny_loaded.tokenizer), "default",
                                JudgeConfig(principle_ids="harm-violence,harm-weapons", aggregate=aggregate))
    result = judge.score(["q"], ["a"], ["b"])
    torch.testing.assert_close(result.principle_label[0], torch.tensor([0.8, 0.3]))
    assert result.label.item() == pytest.approx(expected, abs=1e-6)
    assert result.principle_ids == [["harm-violence", "harm-weapons"]]
    torch.testing.assert_close(result.option_mass[0], torch.full((2, 2), math.exp(-5.0)))


def test_chain_of_thought_clamps_each_order_to_40_60(sharp_loaded):
    judge = ConstitutionalJudge(sharp_loaded, "default",
                                JudgeConfig(principles=1, chain_of_thought=1, cot_tokens=5))
    prompts, a, b = random_pairs(3, seed=5)
    result = judge.score(prompts, a, b)
    for p in (result.p_ab_a, result.p_ba_b):
        assert ((p >= 0.4 - 1e-6) & (p <= 0.6 + 1e-6)).all()
    assert math.isclose(1 / (1 + math.exp(-COT_CLAMP)), 0.6)
    assert len(result.rationales) == 3 and len(result.rationales[0][0]) == 2
    assert judge.stats.rationale_tokens > 0


def test_few_shot_block_comes_first_and_alternates_the_answer(tiny_loaded):
    judge = ConstitutionalJudge(ToyScorer(tiny_loaded.tokenizer), "default", JudgeConfig(few_shot=2))
    answers = [m["content"] for m in judge.few_shot if m["role"] == "assistant"]
    assert answers == ["The answer is: (B)", "The answer is: (A)"]
    chat = judge.judge_chat("Human: hi", "x", "y", judge.constitution.principles[0])
    assert chat[:4] == judge.few_shot and chat[-1]["content"].endswith(judge.constitution.principles[0].judge)


def test_principles_of_one_order_share_the_prefix_up_to_the_question(tiny_loaded):
    judge = ConstitutionalJudge(ToyScorer(tiny_loaded.tokenizer), "default", JudgeConfig(principles=3))
    principles = judge.constitution.principles[:3]
    rows = [P.render_continuation(judge.tokenizer, judge.judge_chat("Human: q", "one", "two", p), "The answer is: (")
            for p in principles]
    shared = min(len(r) for r in rows)
    shared = next(i for i in range(shared) if len({r[i] for r in rows}) > 1)
    text = judge.tokenizer.decode(rows[0][:shared])  # the rows part where the questions begin
    assert f"=== End of Response (B) [{P.judge_tag('Human: q', judge.tag_key)}] ===\n\n" in text


# ---------------------------------------------------------------- option tokens


def test_options_of_the_tiny_bpe_tokenizer(tiny_loaded):
    layout = detect_options(tiny_loaded.tokenizer)
    tok = tiny_loaded.tokenizer
    assert layout.mode == "single-token" and layout.prefix == "The answer is: ("
    assert [tok.decode(list(t)) for t in layout.token_ids] == ["A", "B"]


def test_options_of_the_default_models_tokenizer(default_loaded):
    layout = detect_options(default_loaded.tokenizer)
    assert layout.mode == "single-token" and layout.options == ("A", "B")
    assert [default_loaded.tokenizer.decode(list(t)) for t in layout.token_ids] == ["A", "B"]


def _metaspace_tokenizer(merges: list[tuple[str, str]], letters: str):
    """A SentencePiece-style BPE over `letters` + punctuation, with the given merges and ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cai_fast.engine.loading import CHATML

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(letters + string.digits + string.punctuation + "▁\n"))
    vocab = {t: i for i, t in enumerate(specials + chars + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<unk>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def test_options_that_merge_with_the_parenthesis_fall_back_to_sequence_scoring(tiny_loaded):
    """"(A" is one token here, so after "... (" the letter is not a token of its own, and " (A" /
    " A" are two tokens: no single-token layout exists; the options are scored as sequences."""
    tok = _metaspace_tokenizer([("(", "A"), ("(", "B"), ("▁", "(")], string.ascii_letters)
    layout = detect_options(tok)
    assert layout.mode == "sequence" and layout.prefix == "The answer is:" and layout.options == (" (A", " (B")
    assert [len(t) for t in layout.token_ids] == [2, 2] and layout.token_ids[0][0] == layout.token_ids[1][0]
    assert "(sequence)" in layout.describe()


def test_sequence_fallback_scores_end_to_end_and_stays_antisymmetric(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _metaspace_tokenizer([("(", "A"), ("(", "B"), ("▁", "(")], string.ascii_letters)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    judge = ConstitutionalJudge(model, "default", JudgeConfig(principles=2), tokenizer=tok)
    prompts, a, b = random_pairs(2, seed=6)
    total = judge.score(prompts, a, b).label + judge.score(prompts, b, a).label
    torch.testing.assert_close(total, torch.ones(2), atol=2e-6, rtol=0)


def test_a_tokenizer_without_the_letters_is_a_clear_error():
    tok = _metaspace_tokenizer([], "abcdefghijklmnopqrstuvwxyzT")  # "A" and "B" become <unk>
    with pytest.raises(JudgeError, match="cannot express the judge's options"):
        detect_options(tok)


# ---------------------------------------------------------------- trl interface


def test_trl_judge_returns_indices_and_scores(sharp_judge):
    prompts, a, b = random_pairs(4, seed=7)
    completions = [[x, y] for x, y in zip(a, b)]
    labels = sharp_judge.score(prompts, a, b).label.tolist()
    assert sharp_judge.judge(prompts, completions) == [0 if p >= 0.5 else 1 for p in labels]
    assert sharp_judge.judge(prompts, completions, shuffle_order=False) == sharp_judge.judge(prompts, completions)
    scores = sharp_judge.judge(prompts, completions, return_scores=True)
    assert all(isinstance(s, float) for s in scores) and scores == pytest.approx(labels, abs=1e-6)


def test_trl_judge_takes_conversational_completions_and_empty_ones(sharp_judge):
    msg = [{"role": "user", "content": "Hello?"}]
    completions = [[[{"role": "assistant", "content": "Hi there."}], [{"role": "assistant", "content": "Go."}]],
                   ["", "something"], ["", "  "], ["same", "same"]]
    assert sharp_judge.judge([msg] * 4, completions)[1:] == [1, -1, 0]
    assert sharp_judge.judge([msg] * 4, completions, return_scores=True)[1:] == [0.0, 0.5, 0.5]


def test_trl_base_class_is_the_old_interface():
    from cai_fast.labelling.trl_compat import BasePairwiseJudge

    assert issubclass(ConstitutionalJudge, BasePairwiseJudge)
    with pytest.raises(TypeError):
        BasePairwiseJudge()


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("args, message", [
    ((["q"], [" "], ["b"]), r"responses_a\[0\] is empty"),
    ((["q", "r"], ["a", "b"], ["c", []]), r"responses_b\[1\] is empty"),
    ((["q"], ["a"], ["b", "c"]), "got 1 prompts, 1 responses_a and 2 responses_b"),
    (([""], ["a"], ["b"]), r"prompts\[0\] is empty"),
    (([{"text": "q"}], ["a"], ["b"]), r"prompts\[0\]: expected text or a list of \{role, content\}"),
])
def test_bad_pairs_are_clear_errors(sharp_judge, args, message):
    with pytest.raises(JudgeInputError, match=message):
        sharp_judge.score(*args)


def test_unknown_principle_id_is_a_clear_error(tiny_loaded):
    with pytest.raises(ConstitutionError, match="no principle 'harm-unicorns'; valid ids: harm-violence"):
        ConstitutionalJudge(ToyScorer(tiny_loaded.tokenizer), "default",
                            JudgeConfig(principle_ids="harm-violence,harm-unicorns"))


def test_more_principles_than_the_constitution_has_is_a_clear_error(tiny_loaded):
    with pytest.raises(JudgeError, match="has only 5; ask for at most 5"):
        ConstitutionalJudge(ToyScorer(tiny_loaded.tokenizer), "helpful", JudgeConfig(principles=6))


@pytest.mark.parametrize("field, value, message", [
    ("aggregate", "median", "aggregate must be one of prob, logodds"),
    ("principles", 0, "principles must be >= 1"),
    ("chain_of_thought", 2, "chain_of_thought must be 0 or 1"),
])
def test_bad_config_values_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig(**{field: value})


def test_a_model_without_tokenizer_is_a_clear_error(tiny_loaded):
    with pytest.raises(TypeError, match="transformers causal LM with tokenizer="):
        ConstitutionalJudge(tiny_loaded.model)


# ---------------------------------------------------------------- direct scores (d-RLAIF)


def full_forward_scores(model, rows: list[list[int]], digit_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[s] [N], digit mass [N]) from a plain full forward: softmax over the whole vocabulary at the
    answer position, the nine digits' probabilities, renormalised."""
    scores, masses = [], []
    for row in rows:
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1].float(), -1)[digit_ids]
        scores.append((p / p.sum() * torch.arange(1, 10)).sum())
        masses.append(p.sum())
    return torch.stack(scores), torch.stack(masses)


@pytest.mark.parametrize("engine", ["plain", "cached"])
def test_direct_scores_equal_a_full_forwards_digit_probabilities(sharp_loaded, engine):
    judge = ConstitutionalJudge(make_generator(sharp_loaded, engine=engine, batch_size=3), "default",
                                JudgeConfig(principles=2))
    prompts, responses, _ = random_pairs(4, seed=5)
    result = judge.rate(prompts, responses)
    layout = judge.score_layout
    assert layout.mode == "single-token" and len(layout.token_ids) == 9
    rows = [P.render_continuation(sharp_loaded.tokenizer, [P.user(P.score_request(
                P.conversation_text(prompt), response, judge.constitution.principle(pid).judge,
                reserved=judge.reserved, key=judge.tag_key))], layout.prefix)
            for prompt, response, ids in zip(prompts, responses, result.principle_ids) for pid in ids]
    want, mass = full_forward_scores(sharp_loaded.model, rows, [t[0] for t in layout.token_ids])
    torch.testing.assert_close(result.principle_score.flatten(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.digit_mass.flatten(), mass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.score, want.reshape(4, 2).mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(4, 2))
    assert (result.principle_score - 5).abs().max() > 0.3, "the sharpened model should have opinions"
    assert judge.stats.responses_rated == 4 and judge.stats.judge_prompts == 8


def test_direct_scores_do_not_depend_on_the_batch_and_draw_principles_by_content(sharp_judge):
    prompts, responses, _ = random_pairs(5, seed=6)
    whole = sharp_judge.rate(prompts, responses)
    one = sharp_judge.rate(prompts[2:3], responses[2:3])
    assert one.principle_ids[0] == whole.principle_ids[2] and len(set(map(tuple, whole.principle_ids))) > 1
    torch.testing.assert_close(one.score[0], whole.score[2], atol=1e-5, rtol=0)
    assert sharp_judge.rate([], []).score.shape == (0,)


def test_direct_score_prompt_quotes_the_response_and_asks_the_principles_question(tiny_loaded):
    question = load_constitution("default").principles[0].judge
    text = P.score_request("Human: hi", "hello ===", question, reserved=[], key="k")
    assert "=== Response [" in text and "hello = = =" in text and "(A)" not in text
    assert question.replace(" Answer (A) or (B).", "") in text and "from 1 to 9" in text


def test_direct_score_digits_of_the_tiny_tokenizer(tiny_loaded):
    from cai_fast.labelling.judge import SCORE_LAYOUTS

    layout = detect_options(tiny_loaded.tokenizer, SCORE_LAYOUTS)
    assert layout.prefix == "Score: " and layout.mode == "single-token"
    assert [tiny_loaded.tokenizer.decode(list(t)) for t in layout.token_ids] == [str(s) for s in range(1, 10)]


def test_direct_score_digits_of_the_default_models_tokenizer(default_loaded):
    from cai_fast.labelling.judge import SCORE_LAYOUTS

    layout = detect_options(default_loaded.tokenizer, SCORE_LAYOUTS)
    assert layout.prefix == "Score: " and layout.mode == "single-token"
    assert [default_loaded.tokenizer.decode(list(t)) for t in layout.token_ids] == [str(s) for s in range(1, 10)]


def test_bad_direct_score_inputs_are_clear_errors(sharp_judge, sharp_loaded):
    with pytest.raises(JudgeInputError, match="got 2 prompts and 1 responses; pass one of each per response"):
        sharp_judge.rate(["q", "r"], ["a"])
    with pytest.raises(JudgeInputError, match=r"responses\[0\] is empty"):
        sharp_judge.rate(["q"], [" "])
    cot = ConstitutionalJudge(sharp_loaded, "default", JudgeConfig(principles=1, chain_of_thought=1))
    with pytest.raises(JudgeError, match="set chain_of_thought = 0"):
        cot.rate(["q"], ["a"])

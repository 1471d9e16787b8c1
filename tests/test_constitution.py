"""Constitution loading, validation messages, seeded weighted sampling and fingerprints."""

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from cai_fast.data.constitution import (
    Constitution,
    ConstitutionError,
    available_constitutions,
    constitution_from_dict,
    load_constitution,
)

VALID = '''
name = "tiny"
version = "0.1"
description = "for tests"

[[few_shot]]
principle = "alpha"
prompt = "p"
response = "r"
critique = "c"
revision = "v"

[[principles]]
id = "alpha"
category = "harm"
weight = 2.0
critique = "critique alpha"
revision = "revise alpha"
judge = "Which is better for alpha? Answer (A) or (B)."

[[principles]]
id = "beta-2"
category = "honesty"
weight = 1
critique = "critique beta"
revision = "revise beta"
judge = "Which is better for beta? Answer (A) or (B)."
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    message = str(info.value)
    assert str(path) in message
    return message


def random_constitution(rng: random.Random, n: int) -> Constitution:
    principles = [
        {"id": f"p{i}", "category": "c", "weight": rng.choice([0.25, 0.5, 1, 2.0, 3.5]),
         "critique": "c", "revision": "r", "judge": "j"}
        for i in range(n)
    ]
    data = {"name": "rand", "version": "1", "description": "d", "principles": principles}
    return constitution_from_dict(data, source="<random>")


# ---------------------------------------------------------------- shipped constitutions

@pytest.mark.parametrize("name", ["default", "helpful"])
def test_shipped_constitutions_load(name):
    c = load_constitution(name)
    assert c.name == name and c.principles and c.few_shot
    assert all(p.judge.rstrip().endswith("Answer (A) or (B).") for p in c.principles)
    assert all(f.principle is None or f.principle in c.ids for f in c.few_shot)
    assert name in available_constitutions()


def test_default_constitution_covers_the_required_ground():
    c = load_constitution("default")
    assert len(c.principles) >= 18 and len(c.few_shot) >= 3
    required = {"harm", "honesty", "helpfulness", "autonomy", "child-safety", "privacy",
                "sycophancy", "jailbreak", "over-refusal", "fairness", "manipulation"}
    assert required <= {p.category for p in c.principles}
    assert len({p.weight for p in c.principles}) >= 3  # weights differ: sampling by weight matters


def test_helpful_constitution_is_small():
    c = load_constitution("helpful")
    assert 4 <= len(c.principles) <= 6 and len(c.few_shot) == 1


def test_load_by_path_str_and_path(tmp_path):
    path = write(tmp_path, VALID)
    a, b = load_constitution(path), load_constitution(str(path))
    assert a == b and a.ids == ("alpha", "beta-2") and a.source == str(path)
    assert a.principle("beta-2").weight == 1.0 and isinstance(a.principle("beta-2").weight, float)
    assert a.few_shot[0].principle == "alpha"


def test_few_shot_principle_is_optional_and_few_shot_section_too(tmp_path):
    c = load_constitution(write(tmp_path, VALID.replace('principle = "alpha"\n', "")))
    assert c.few_shot[0].principle is None
    head, _, rest = VALID.partition("[[few_shot]]")
    c = load_constitution(write(tmp_path, head + rest[rest.index("[[principles]]"):]))
    assert c.few_shot == ()


# ---------------------------------------------------------------- bad files, one message each

def test_syntax_error_reports_line(tmp_path):
    line = VALID.splitlines().index("weight = 2.0") + 1
    message = load_error(tmp_path, VALID.replace("weight = 2.0", "weight = = 2.0"))
    assert "invalid TOML" in message and f"line {line}," in message


def test_missing_field(tmp_path):
    message = load_error(tmp_path, VALID.replace('judge = "Which is better for beta?', '# "'))
    assert "principle 'beta-2'" in message and "'judge'" in message and "missing" in message


def test_missing_id_names_the_index(tmp_path):
    message = load_error(tmp_path, VALID.replace('id = "beta-2"\n', ""))
    assert "principles[1]" in message and "'id'" in message and "missing" in message


def test_bad_id_names_the_index(tmp_path):
    message = load_error(tmp_path, VALID.replace('id = "beta-2"', 'id = "Beta Two"'))
    assert "principles[1]" in message and "'id'" in message and "lowercase" in message


def test_unknown_field_suggests_the_right_one(tmp_path):
    message = load_error(tmp_path, VALID.replace('judge = "Which is better for a', 'jduge = "'))
    assert "principle 'alpha'" in message and "'jduge'" in message
    assert "did you mean 'judge'" in message


def test_unknown_top_level_field(tmp_path):
    message = load_error(tmp_path, 'author = "me"\n' + VALID)
    assert "top level" in message and "'author'" in message and "unknown field" in message


def test_wrong_type(tmp_path):
    message = load_error(tmp_path, VALID.replace('weight = 2.0', 'weight = "2.0"'))
    assert "principle 'alpha'" in message and "'weight'" in message
    assert "expected a number" in message
    message = load_error(tmp_path, VALID.replace('version = "0.1"', "version = 0.1"))
    assert "'version'" in message and "expected a quoted string" in message


def test_boolean_weight_is_a_wrong_type(tmp_path):
    message = load_error(tmp_path, VALID.replace('weight = 2.0', "weight = true"))
    assert "'weight'" in message and "expected a number" in message


def test_principles_as_single_table(tmp_path):
    message = load_error(tmp_path, VALID.split("[[principles]]")[0] + '[principles]\nid = "x"\n')
    assert "'principles'" in message and "[[...]]" in message


def test_empty_string(tmp_path):
    message = load_error(tmp_path, VALID.replace('critique = "critique beta"', 'critique = "  "'))
    assert "principle 'beta-2'" in message and "'critique'" in message and "empty" in message


def test_empty_string_in_few_shot(tmp_path):
    message = load_error(tmp_path, VALID.replace('response = "r"', 'response = ""'))
    assert "few_shot[0]" in message and "'response'" in message and "empty" in message


def test_duplicate_id(tmp_path):
    message = load_error(tmp_path, VALID.replace('id = "beta-2"', 'id = "alpha"'))
    assert "duplicate id 'alpha'" in message
    assert "principles[0]" in message and "principles[1]" in message


@pytest.mark.parametrize("weight", ["0", "-1.5", "nan", "inf"])
def test_bad_weight(tmp_path, weight):
    message = load_error(tmp_path, VALID.replace("weight = 2.0", f"weight = {weight}"))
    assert "principle 'alpha'" in message and "'weight'" in message and "> 0" in message


def test_no_principles(tmp_path):
    message = load_error(tmp_path, "principles = []\n" + VALID.split("[[principles]]")[0])
    assert "no principles" in message and "[[principles]]" in message
    message = load_error(tmp_path, VALID.split("[[principles]]")[0])
    assert "no principles" in message


def test_few_shot_naming_unknown_principle(tmp_path):
    message = load_error(tmp_path, VALID.replace('principle = "alpha"', 'principle = "gamma"'))
    assert "few_shot[0]" in message and "'principle'" in message and "'gamma'" in message
    assert "alpha, beta-2" in message


def test_unknown_name_lists_available():
    with pytest.raises(ConstitutionError) as info:
        load_constitution("no-such-constitution")
    assert "'no-such-constitution'" in str(info.value)
    assert all(name in str(info.value) for name in ("default", "helpful"))


def test_missing_file(tmp_path):
    with pytest.raises(ConstitutionError, match="not found"):
        load_constitution(tmp_path / "absent.toml")


def test_unknown_principle_lookup(tmp_path):
    c = load_constitution(write(tmp_path, VALID))
    with pytest.raises(ConstitutionError) as info:
        c.principle("gamma")
    assert "'gamma'" in str(info.value) and "alpha, beta-2" in str(info.value)


# ---------------------------------------------------------------- sampling

def test_sampling_is_reproducible_per_key_and_order_independent():
    c = random_constitution(random.Random(11), 13)
    keys = [f"prompt-{i}:round-{r}" for i in range(40) for r in range(3)]
    forward = {key: c.sample(key, 3, seed=5) for key in keys}
    backward = {key: c.sample(key, 3, seed=5) for key in reversed(keys)}
    assert forward == backward
    assert len({tuple(p.id for p in v) for v in forward.values()}) > len(keys) // 2
    reseeded = {key: c.sample(key, 3, seed=6) for key in keys}
    assert reseeded != forward


def test_sampling_with_replacement_follows_weights():
    c = random_constitution(random.Random(3), 7)
    draws = 40_000
    counts = Counter(c.sample(f"k{i}", 1, seed=1)[0].id for i in range(draws))
    total = sum(p.weight for p in c.principles)
    chi2 = sum((counts[p.id] - draws * p.weight / total) ** 2 / (draws * p.weight / total)
               for p in c.principles)
    assert chi2 < 24.3  # 99.95th percentile of chi-square with 6 degrees of freedom


def test_sampling_many_draws_from_one_key():
    c = random_constitution(random.Random(4), 5)
    drawn = c.sample("one-key", 20_000, seed=2)
    total = sum(p.weight for p in c.principles)
    counts = Counter(p.id for p in drawn)
    for p in c.principles:
        assert math.isclose(counts[p.id] / 20_000, p.weight / total, abs_tol=0.02)


def test_sampling_without_replacement():
    c = random_constitution(random.Random(7), 9)
    for i in range(200):
        ids = [p.id for p in c.sample(f"k{i}", 4, seed=0, replace=False)]
        assert len(set(ids)) == 4
    assert {p.id for p in c.sample("all", 9, seed=0, replace=False)} == set(c.ids)
    with pytest.raises(ConstitutionError, match="only 9 principles"):
        c.sample("k", 10, seed=0, replace=False)


def test_sampling_without_replacement_favours_heavy_principles():
    data = {"name": "n", "version": "1", "description": "d", "principles": [
        {"id": i, "category": "c", "weight": w, "critique": "c", "revision": "r", "judge": "j"}
        for i, w in (("heavy", 9.0), ("light-a", 0.5), ("light-b", 0.5))]}
    c = constitution_from_dict(data, source="<dict>")
    firsts = Counter(c.sample(f"k{i}", 2, seed=3, replace=False)[0].id for i in range(2000))
    assert 0.85 < firsts["heavy"] / 2000 < 0.95  # expected 0.9


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_sampling_rejects_bad_k(k):
    with pytest.raises(ConstitutionError, match="k must be an integer >= 1"):
        load_constitution("helpful").sample("k", k, seed=0)


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_tracks_content_not_location(tmp_path):
    a = load_constitution(write(tmp_path, VALID))
    moved = tmp_path / "sub" / "same.toml"
    moved.parent.mkdir()
    moved.write_text(VALID, encoding="utf-8")
    assert load_constitution(moved).fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 64
    for old, new in [("critique alpha", "critique alpha!"), ("weight = 2.0", "weight = 2.5"),
                     ('response = "r"', 'response = "r2"'), ('version = "0.1"', 'version = "0.2"')]:
        changed = load_constitution(write(tmp_path, VALID.replace(old, new)))
        assert changed.fingerprint() != a.fingerprint(), old

"""SL-CAI: initial answers, K rounds of critique and revision, and the datasets they give.

For each prompt x: y0 = the model's answer; then for each round k (1..K) a principle is drawn by weight (seeded
by prompt id and run seed, so the same on resume), the model critiques its latest answer against it and revises.
Records keep the whole trace; every step's prompt extends the one before (see cai_fast.data.prompts). Outputs:
  sft_messages/          {"messages": [user x, assistant y_K]}              (SFTTrainer)
  sft_prompt_completion/ {"prompt": [user x], "completion": [assistant y_K]} (SFTTrainer)
  preference/            {"prompt", "chosen": y_K, "rejected": y0, ...}      (DPOTrainer, RewardTrainer)
in trl's JSONL formats; a pair whose final revision equals the initial answer is left out of preference/ (counted).
With `helpful_mix` > 0 the SFT sets also hold the policy's own answers to the first round(helpful_mix × kept)
helpful prompts (`helpful_rows`), as the paper mixes helpfulness samples in; preference/ does not.
With `filter` (the default) both keep only records whose final revision is a reply to the user
(cai_fast.revisions); the summary's `revisions` counts each verdict, with examples, and `too_few` says
when fewer than `min_kept` remain.

Who writes what: the policy the initial answers; the critiques and the revisions the policy too, or a
critic and a reviser of their own (config.critique_model, ..., whose generators `feedback_generators`
opens). Each model gets the same growing chat as messages, rendered with its own chat template, so each
keeps the prefix sharing in its own cache; roles written by one model share one generator. Every record
names the model of each role (`models`), the summary each role's model and engine.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from .data import prompts as P
from .data.constitution import Constitution
from .data import Prompt, load_prompts
from .engine import Generator, SamplingParams
from .engine.base import complete_chats, engine_record
from .engine.chat_api import api_usage
from .engine.server.http import ServerError
from .engine.loading import ModelLoadError, model_sha256
from .labelling.pairs import same_response
from .revisions import revision_quality, revision_verdict
from .seeding import stable_seed
from .config import CHAT_API
from .sl_cai_config import FEEDBACK_ROLES, SLCAIConfig, without_unset_options
from .responses import sample_responses
from .store import RunStore, resume_batches, write_jsonl

RECORDS = "records"
HELPFUL = "helpful"
KEYWORDS = dict(zip(FEEDBACK_ROLES, ("critic", "reviser")))  # run_sl_cai's keyword for each role's generator


@dataclass
class SLCAIResult:
    records: list[dict]
    sft_messages: object  # datasets.Dataset
    sft_prompt_completion: object
    preference: object
    summary: dict


@dataclass(frozen=True)
class Writers:
    """Who writes each role of the trace ("initial", "critique", "revision"): its model's name and its
    generator (one object for the roles one model writes)."""

    names: dict[str, str]
    generators: dict[str, Generator]

    @property
    def distinct(self) -> list[Generator]:
        return list({id(g): g for g in self.generators.values()}.values())


def writers_of(generator: Generator, config: SLCAIConfig, policy_name: str = "policy", *,
               critic: Generator | None = None, reviser: Generator | None = None) -> Writers:
    """The Writers of a run: the policy's generator for a role whose options (config.critique_*, revision_*)
    are empty, else the one given; ValueError where the config and the generators given disagree."""
    given = {"critique": critic, "revision": reviser}
    for role, keyword in KEYWORDS.items():
        if bool(config.role_options(role)) != (given[role] is not None):
            raise ValueError(f"{keyword}= and config.{role}_model/{role}_engine/{role}_server_url go together: give "
                             f"both (feedback_generators opens it from the config) or neither (the policy writes it)")
    names = {"initial": policy_name, **{role: getattr(config, f"{role}_model") or policy_name for role in given}}
    return Writers(names, {"initial": generator, **{role: g or generator for role, g in given.items()}})


def feedback_generators(policy: Generator, policy_options: dict, config: SLCAIConfig,
                        open_model: Callable[[dict], Generator]) -> dict[str, Generator | None]:
    """{"critic": ..., "reviser": ...}, run_sl_cai's keywords: None for a role the policy writes (no option of its
    own); else open_model({"model", "engine", "server_url", "api_key_env"}: the policy's `policy_options` with the
    role's own over them; a role's own api_key_env only with engine openai), once per distinct set (a critic that
    also revises is opened once), the policy's generator itself where they are the policy's. A role's generator
    that cannot be opened (a chat API's key unset or refused, a server down) is a one-line error naming the role."""
    opened = {json.dumps(policy_options, sort_keys=True): policy}
    out = {}
    for role, keyword in KEYWORDS.items():
        own = config.role_options(role)
        options = {**policy_options, **own}
        if "api_key_env" in own and options["engine"] != CHAT_API:
            raise ValueError(f"{role}_api_key_env names an API key, but the {role} model runs on engine "
                             f"{options['engine']}, which sends none; drop it or set {role}_engine = {CHAT_API}")
        key = json.dumps(options, sort_keys=True)
        if own and key not in opened:
            try:
                opened[key] = open_model(options)
            except ServerError as err:
                raise type(err)(f"{role}_model {options['model']}: {err}") from None
        out[keyword] = opened[key] if own else None
    return out


def feedback_digests(config: SLCAIConfig, policy_engine: str) -> dict[str, str]:
    """{"critique_model_sha256": ..., "revision_model_sha256": ...} of the roles with a model of their own that
    is a model here (not a chat API's name), so that run configs compare them by content; a model that is not
    there is a one-line ModelLoadError naming the option."""
    digests = {}
    for role in FEEDBACK_ROLES:
        own = config.role_options(role)
        if "model" in own and own.get("engine", policy_engine) != CHAT_API:
            try:
                digests[f"{role}_model_sha256"] = model_sha256(own["model"])
            except ModelLoadError as err:
                raise ModelLoadError(f"{role}_model: {err}") from None
    return digests


def run_batch(generator: Generator, constitution: Constitution, batch: Sequence[Prompt],
              config: SLCAIConfig, writers: Writers | None = None) -> list[dict]:
    """The whole SL-CAI trace of a batch of prompts: initial answers, then K rounds (each role written by
    `writers`' generator for it; default: `generator`)."""
    writers = writers or writers_of(generator, config)
    prefix = P.few_shot_messages(constitution, config.few_shot)
    chats = [prefix + [P.user(p.text)] for p in batch]
    batch_seed = stable_seed(config.seed, batch[0].id)

    def step(role: str, name: str, max_tokens: int, asked=None) -> list:
        """Generate each chat's next turn with `role`'s generator (from `asked`, the chats to generate
        from, where given)."""
        params = SamplingParams(max_tokens, config.temperature, config.top_p, stable_seed(batch_seed, name))
        out = complete_chats(writers.generators[role], asked or chats, params)
        for chat, completion in zip(chats, out):
            chat.append(P.assistant(completion.text))
        return out

    principles = [constitution.sample(p.id, config.rounds, seed=config.seed) for p in batch]
    initial = [c.text for c in step("initial", "initial", config.answer_tokens)]
    rounds = [[] for _ in batch]
    for k in range(config.rounds):
        for chat, chosen in zip(chats, principles):
            chat.append(P.critique_turn(chosen[k]))
        critiques = step("critique", f"critique{k}", config.critique_tokens)
        answers = initial if k == 0 else [trace[-1]["revision"] for trace in rounds]
        fresh = None if config.revision_turn == "chat" else [
            P.fresh_few_shot_messages(constitution, config.few_shot)
            + [P.fresh_revision_turn(p.text, a, c.text, chosen[k])]
            for p, a, c, chosen in zip(batch, answers, critiques, principles)]
        for chat, chosen in zip(chats, principles):
            chat.append(P.revision_turn(chosen[k]))
        revisions = step("revision", f"revision{k}", config.revision_tokens, fresh)
        for trace, chosen, c, r in zip(rounds, principles, critiques, revisions):
            trace.append({"principle_id": chosen[k].id, "critique": c.text, "revision": r.text,
                          "finished": r.finish_reason == "stop"})
    return [_record(p, y0, trace, writers.names) for p, y0, trace in zip(batch, initial, rounds)]


def _record(prompt: Prompt, initial: str, rounds: list[dict], models: dict[str, str]) -> dict:
    return {
        "prompt_id": prompt.id, "prompt": prompt.text, "source": prompt.source,
        "initial": initial, "rounds": rounds, "final": rounds[-1]["revision"],
        "principle_ids": [r["principle_id"] for r in rounds], "models": dict(models),
    }


def run_sl_cai(generator: Generator, constitution: Constitution, prompts: Sequence[Prompt],
               config: SLCAIConfig = SLCAIConfig(), *, critic: Generator | None = None,
               reviser: Generator | None = None, helpful: Sequence[Prompt] | None = None,
               out_dir: str | Path | None = None, run_info: dict | None = None, progress: bool = True) -> SLCAIResult:
    """Run SL-CAI over `prompts`; with `out_dir`, resumably (see cai_fast.store). `generator` is the policy's
    (named by run_info's "model" in records and the summary, else "policy"); `critic` and `reviser` write the
    critiques and the revisions where config.critique_* / revision_* name a model of their own (see
    feedback_generators), else the policy does. `helpful`: the helpful mix's prompts (default: those of
    config.helpful_prompts, read where config.helpful_mix > 0)."""
    writers = writers_of(generator, config, (run_info or {}).get("model", "policy"), critic=critic, reviser=reviser)
    if helpful is None and config.helpful_mix:
        helpful = list(load_prompts(config.helpful_prompts))
    start, before = time.perf_counter(), [(g, replace(g.stats)) for g in writers.distinct]
    store = None if out_dir is None else RunStore(out_dir, _run_config(config, constitution, prompts, run_info,
                                                                        helpful))
    try:
        records, resumed = resume_batches(store, RECORDS, prompts,
                                          lambda batch: run_batch(generator, constitution, batch, config, writers),
                                          batch_size=config.batch_size, desc="SL-CAI", progress=progress)
        result = _result(records, prompts, config)
        result.summary["helpful"] = _mix_helpful(result, generator, helpful or [], config, store, progress)
    finally:  # a failed or interrupted run's API usage is recorded too
        usage = api_usage(before, store)
    result.summary.update(
        prompts=len(prompts), resumed=resumed, rounds=config.rounds, engine=engine_record(generator),
        models={role: {"model": writers.names[role], "engine": engine_record(g)}
                for role, g in writers.generators.items()},
        generated_tokens=sum(g.stats.generated_tokens - b.generated_tokens for g, b in before),
        seconds=round(time.perf_counter() - start, 1), **usage,
    )
    if store:
        result.summary["files"] = _write_datasets(store.root, result)
    return result


def _run_config(config: SLCAIConfig, constitution: Constitution, prompts: Sequence[Prompt],
                run_info: dict | None, helpful: Sequence[Prompt] | None) -> dict:
    mixed = {"helpful_prompts_sha256": _ids_sha256(helpful)} if config.helpful_mix else {}
    return {**without_unset_options(asdict(config)), **(run_info or {}), "stage": "sl-cai",
            "constitution": constitution.name, "constitution_sha256": constitution.fingerprint(),
            "prompts_sha256": _ids_sha256(prompts), "num_prompts": len(prompts), **mixed}


def _ids_sha256(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256("".join(p.id for p in prompts).encode()).hexdigest()


def helpful_rows(generator: Generator, helpful: Sequence[Prompt], count: int, config: SLCAIConfig,
                 store: RunStore | None = None, progress: bool = True) -> list[dict]:
    """The policy's own answers to the first `count` helpful prompts, sampled as the initial answers are
    (answer_tokens, temperature, top_p, seed), as records sft_rows takes ({prompt_id, prompt, final}); resumable
    in `store` (kind "helpful")."""
    params = SamplingParams(config.answer_tokens, config.temperature, config.top_p, config.seed)
    records, _ = sample_responses(generator, helpful[:count], params, 1, store=store, kind=HELPFUL,
                                  batch_size=config.batch_size, progress=progress)
    return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "final": r["samples"][0]} for r in records]


def _mix_helpful(result: SLCAIResult, generator: Generator, helpful: Sequence[Prompt], config: SLCAIConfig,
                 store: RunStore | None, progress: bool) -> dict:
    """Add round(helpful_mix × the SFT rows kept) helpful rows (at most all of `helpful`) to result's SFT sets;
    what was asked and mixed, for the summary."""
    from datasets import Dataset, concatenate_datasets

    asked = round(config.helpful_mix * result.summary["sft_rows"])
    rows = helpful_rows(generator, helpful, asked, config, store, progress) if asked else []
    if rows:
        for name, added in zip(("sft_messages", "sft_prompt_completion"), sft_rows(rows)):
            setattr(result, name, concatenate_datasets([getattr(result, name), Dataset.from_list(added)]))
    return {"mix": config.helpful_mix, "prompts": config.helpful_prompts, "asked": asked, "rows": len(rows)}


def sft_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(messages rows, prompt/completion rows) of the final revisions."""
    messages = [{"messages": [P.user(r["prompt"]), P.assistant(r["final"])], "prompt_id": r["prompt_id"]}
                for r in records]
    completion = [{"prompt": [P.user(r["prompt"])], "completion": [P.assistant(r["final"])],
                   "prompt_id": r["prompt_id"]} for r in records]
    return messages, completion


def preference_rows(records: list[dict]) -> list[dict]:
    """(final revision ≻ initial answer) pairs; pairs where the two are equal (up to whitespace) are left out."""
    return [{"prompt": [P.user(r["prompt"])], "chosen": [P.assistant(r["final"])],
             "rejected": [P.assistant(r["initial"])], "prompt_id": r["prompt_id"],
             "principle_ids": r["principle_ids"]}
            for r in records if not same_response(r["final"], r["initial"])]


def _result(records: list[dict], prompts: Sequence[Prompt], config: SLCAIConfig) -> SLCAIResult:
    from datasets import Dataset

    order = {p.id: i for i, p in enumerate(prompts)}
    records = sorted(records, key=lambda r: order.get(r["prompt_id"], len(order)))
    verdicts = [revision_verdict(r) for r in records]
    quality = revision_quality(records, verdicts)
    trained = [r for r, v in zip(records, verdicts) if v == "reply"] if config.filter else records
    messages, completion = sft_rows(trained)
    preference = preference_rows(trained)
    summary = {"preference_pairs": len(preference), "unchanged": quality["verdicts"]["unchanged"],
               "revisions": quality, "filter": config.filter, "sft_rows": len(messages),
               "too_few": _too_few(len(messages), config)}
    return SLCAIResult(records, Dataset.from_list(messages), Dataset.from_list(completion),
                       Dataset.from_list(preference), summary)


def _too_few(kept: int, config: SLCAIConfig) -> str:
    """Why the `kept` revisions the filter left are too few to train on ("" when they are enough or
    the filter is off)."""
    if kept >= config.min_kept or not config.filter:
        return ""
    return (f"only {kept} final revisions are replies to the user (min_kept = {config.min_kept}), too few to "
            "train on: the model's revisions are mostly commentary about the response or loops (see "
            "'revisions' in the summary). To move harmful compliance, give SL-CAI a stronger critique and revision "
            "model (critique_model, revision_model; README, 'Using a stronger feedback model'): on SmolLM2-135M no "
            "few-shot count, wording, revision turn, rounds or temperature gave replies that decline "
            "(benches/README.md, issue 28)")


def _write_datasets(root: Path, result: SLCAIResult) -> dict:
    files = {}
    for name in ("sft_messages", "sft_prompt_completion", "preference"):
        path = root / name / "train-00000.jsonl"
        write_jsonl(path, getattr(result, name))  # row by row, not a list of them
        files[name] = str(path)
    return files

"""Whether an SL-CAI record's final revision is what SFT should learn: a reply to the user.

    revision_verdict(record) -> "reply" | "empty" | "unchanged" | "commentary" | "repetitive" | "truncated"
    revision_quality(records, verdicts) -> {"verdicts": {verdict: count}, "kept", "dropped", "declines", "examples"}
    revisions_line(sl_cai_summary) -> one sentence for the CLI and the pipeline report

Torch-free: rules on the text (see revision_verdict), and the refusal detector for `declines`.
"""

from __future__ import annotations

import re
from typing import Sequence

from .evaluate.refusal import is_refusal
from .labelling.pairs import same_response

VERDICTS = ("reply", "empty", "unchanged", "commentary", "repetitive", "truncated")
_OPENS_ABOUT = re.compile(
    r"^\W*(?:the|this|that|your|my|its)\s+(?:\w+\s+){0,2}?(?:response|critique|request|revision|answer|reply|"
    r"assistant|statement|article|confidence|content)s?\b"
    r"|^\W*(?:here(?: is|'s) (?:the |a |my )?(?:revised|rewritten|improved|new)|revised response|rewrite:|"
    r"critique:|revision:|i'?m sorry for (?:any|the) confusion)", re.IGNORECASE)
_NAMES_RESPONSE = re.compile(r"\b(?:the|my) (?:previous|last|original|initial|above|assistant'?s?|ai'?s?|revised) "
                             r"(?:response|answer|reply)\b|\bthe (?:request|critique|user)\b|\bcritique request\b"
                             r"|\brevision request\b", re.IGNORECASE)
_WORDS = re.compile(r"[\w']+")
NGRAM = 4
EXAMPLES = 2  # per verdict, in the summary
EXAMPLE_CHARS = 200


def revision_verdict(record: dict) -> str:
    """The first rule that holds: empty (no words); unchanged (the initial answer up to whitespace);
    commentary (about the response instead of to the user: it opens with "The response", "The
    critique", "Your request", "Here is the revised…", "I'm sorry for any confusion", or names the
    previous/original/assistant's response, the request, the critique or "the user"); repetitive
    (of 8 or more word 4-grams, fewer than half distinct: a loop); truncated (a reply that hit
    revision_tokens before its end of turn, where the record says so); otherwise a reply."""
    final = record["final"]
    if not final.split():
        return "empty"
    if same_response(final, record["initial"]):
        return "unchanged"
    if _OPENS_ABOUT.search(final) or _NAMES_RESPONSE.search(final):
        return "commentary"
    words = _WORDS.findall(final.lower())
    grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    if len(grams) >= 8 and len(set(grams)) < len(grams) / 2:
        return "repetitive"
    if record["rounds"][-1].get("finished") is False:
        return "truncated"
    return "reply"


def revision_quality(records: Sequence[dict], verdicts: Sequence[str]) -> dict:
    """Counts of each verdict (revision_verdict of each record) over `records`, how many the filter
    keeps (replies) and drops, how many kept ones decline or redirect, and up to EXAMPLES final
    revisions per verdict."""
    examples: dict[str, list[str]] = {}
    for record, verdict in zip(records, verdicts):
        shown = examples.setdefault(verdict, [])
        if len(shown) < EXAMPLES:
            shown.append(" ".join(record["final"].split())[:EXAMPLE_CHARS])
    kept = [r for r, v in zip(records, verdicts) if v == "reply"]
    return {"verdicts": {v: verdicts.count(v) for v in VERDICTS}, "kept": len(kept),
            "dropped": len(records) - len(kept), "declines": sum(is_refusal(r["final"]) for r in kept),
            "examples": examples}


def revisions_line(summary: dict) -> str:
    """One sentence on an SL-CAI summary's revisions: the verdicts, what the filter kept, and the helpful
    answers mixed in."""
    q, mix = summary["revisions"], summary.get("helpful", {})
    counts = ", ".join(f"{n} {v}" for v, n in q["verdicts"].items() if n)
    kept = (f"the filter kept {q['kept']} for SFT and dropped {q['dropped']}" if summary["filter"]
            else "the filter is off: all of them are trained on")
    mixed = (f"; {mix['rows']} of the policy's answers to {mix['prompts']} prompts mixed in (helpful_mix = "
             f"{mix['mix']:g}{', fewer prompts than asked' if mix['rows'] < mix['asked'] else ''})"
             if mix.get("mix") else "")
    return f"final revisions: {counts}; {kept} ({q['declines']} of the replies decline or redirect){mixed}"

"""Web reasoning extraction (NaturalReasoning style): web documents → reasoning questions.

    filter ──▶ scorer ──▶ questioner ──▶ accepted: scores, question, reference answer
      │          │            └─ failed bad_llm_output: no usable {"question", "answer"} JSON
      │          ├─ failed bad_llm_output: no usable JSON scores (missing, non-numeric, out of range)
      │          └─ rejected, stage "score": mean score < min_mean_score
      ├─ rejected, stage "rule": cheap rules (length, sentences, letters, repetition,
      │  boilerplate) — no LLM call is made for these documents
      └─ rejected, stage "llm_filter": the LLM did not answer yes

A rejection is a normal result (status ok) that ends the task early:
``{"accepted": False, "rejected_by": role, "stage": ..., "reason": ...}``. Only an unusable
row or LLM reply fails a task. A filter reply that is neither yes nor no counts as no:
the dataset should hold only documents the model approved.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from matrix_hpc.agents import Agent, AgentContext, Task

__all__ = ["BadOutput", "Filter", "Questioner", "RuleLimits", "Scorer"]
__all__ += ["extract_json_object", "metrics", "parse_qa", "parse_scores", "parse_yes_no", "rule_check"]

SCALE = (1, 5)  # the score range the scorer prompt asks for
DEFAULT_CRITERIA = {
    "reasoning_depth": "does it explain causes, mechanisms or trade-offs rather than list facts?",
    "factual_density": "how many concrete, checkable facts does it contain?",
    "clarity": "is it clear and well organised?",
}
FILTER_QUESTION = "Does this text contain enough substantive, factual content to base a reasoning question on? Answer yes or no."
FILTER_SYSTEM = ("You screen web pages. Say yes if the text explains facts, causes or how something works; say no if it "
                 "is an advert, a menu, a notice or a personal note. Answer with one word: yes or no.")  # fmt: skip
# Every LLM step first shows one worked example (a short document and the ideal reply): it pins the
# reply's format. Measured with SmolLM2-135M: parseable scores went from 0/12 to 9/12, questions from
# 0/12 to 6/12, and the filter stopped answering "No. The text ..." to nearly every document.
EXAMPLE_DOC = ("Title: Why metal feels cold\n\nMetal draws heat from your hand faster than wood at the same "
               "temperature. Your skin senses the rate of heat loss, not the temperature.")  # fmt: skip
EXAMPLE_JUNK = "Title: Cookie notice\n\nWe use cookies. Accept all. Manage preferences. Privacy policy."
EXAMPLE_SCORES = (3, 2, 5)  # cycled over the configured criteria
EXAMPLE_QA = {"question": "Why does a metal spoon feel colder than a wooden one at the same temperature?",
              "answer": "Metal conducts heat away from the hand faster, and skin senses the rate of heat loss."}  # fmt: skip
BOILERPLATE = ("we use cookies", "accept all", "cookie settings", "privacy policy", "terms of service",
               "all rights reserved", "sign in", "subscribe now", "enable javascript", "not found")  # fmt: skip


class BadOutput(ValueError):
    """The LLM's reply cannot be used; the message says why."""


@dataclass(frozen=True)
class RuleLimits:
    """The filter's cheap rules (role param ``rules``); a document must pass all of them."""

    min_words: int = 60
    max_chars: int = 2400  # longer pages would also crowd the embedded engine's 1024-token slots
    min_sentences: int = 3
    min_alpha_ratio: float = 0.8  # letters among non-space characters: tables and link dumps score low
    min_unique_ratio: float = 0.4  # distinct words / words: keyword spam repeats itself
    max_boilerplate_hits: int = 2  # one phrase alone ("sign in") can occur in a real article
    boilerplate: tuple[str, ...] = BOILERPLATE

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RuleLimits:
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"filter params.rules: unknown key(s) {sorted(unknown)}")
        base = cls()
        # Cast to the defaults' types, so "60" from a key=value override or a YAML list works.
        cast: dict[str, Any] = {k: tuple(str(p).lower() for p in v) if k == "boilerplate" else type(getattr(base, k))(v) for k, v in params.items()}
        return cls(**cast)


_WORD = re.compile(r"[^\W\d_][\w'-]*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def rule_check(text: str, limits: RuleLimits) -> str | None:
    """Why ``text`` is not worth an LLM call, or None when it passes every rule."""
    if len(text) > limits.max_chars:
        return f"too long: {len(text)} chars > max_chars {limits.max_chars}"
    words = _WORD.findall(text)
    if len(words) < limits.min_words:
        return f"too short: {len(words)} words < min_words {limits.min_words}"
    visible = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in visible) / max(len(visible), 1)
    if alpha < limits.min_alpha_ratio:
        return f"mostly non-alphabetic: {alpha:.2f} letters < min_alpha_ratio {limits.min_alpha_ratio}"
    sentences = len(_SENTENCE_END.findall(text))
    if sentences < limits.min_sentences:
        return f"too few sentences: {sentences} < min_sentences {limits.min_sentences}"
    unique = len({w.lower() for w in words}) / len(words)
    if unique < limits.min_unique_ratio:
        return f"repetitive: {unique:.2f} distinct words < min_unique_ratio {limits.min_unique_ratio}"
    hits = [p for p in limits.boilerplate if p in text.lower()]
    if len(hits) >= limits.max_boilerplate_hits:
        return f"boilerplate: {', '.join(repr(h) for h in hits[:4])}"
    return None


_LEADING_YES_NO = re.compile(r"\W*(yes|no)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True/False for yes/no, else None. A leading yes/no wins ("No, although..."); else only one may occur."""
    lead = _LEADING_YES_NO.match(text)
    if lead:
        return lead.group(1).lower() == "yes"
    found = {w.lower() for w in _YES_NO.findall(text)}
    return found.pop() == "yes" if len(found) == 1 else None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: in a ```json fence, bare, or wrapped in prose."""
    decoder = json.JSONDecoder()
    # Fenced blocks first: the prose around a fence may hold stray braces.
    for chunk in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        for brace in re.finditer(r"\{", chunk):
            try:
                obj, _ = decoder.raw_decode(chunk, brace.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise BadOutput("no JSON object in the reply")


def parse_scores(text: str, criteria: Iterable[str]) -> dict[str, float]:
    """Each criterion's score from the reply's JSON object; every score must lie within :data:`SCALE`."""
    obj = {str(k).strip().lower().replace(" ", "_"): v for k, v in extract_json_object(text).items()}
    lo, hi = SCALE
    scores: dict[str, float] = {}
    for name in criteria:
        if name not in obj:
            raise BadOutput(f"score {name!r} missing")
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadOutput(f"score {name!r} is not a number: {value!r}")
        if not lo <= value <= hi:
            raise BadOutput(f"score {name!r}={value} outside {lo}-{hi}")
        scores[name] = value
    return scores


def parse_qa(text: str) -> tuple[str, str]:
    """``(question, answer)`` from the reply's JSON object; both must be non-empty strings."""
    obj = extract_json_object(text)
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise BadOutput(f"{key!r} missing or not a non-empty string")
    return obj["question"].strip(), obj["answer"].strip()


def _excerpt(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "…")


def _document(row: dict[str, Any]) -> str:
    return f"Title: {row.get('title') or '(none)'}\n\n{row['text']}"


class _Stage(Agent):
    """What the three roles share: the LLM call, and how a task ends."""

    async def ask(self, task: Task, system: str, user: str, examples: Iterable[tuple[str, str]] = ()) -> str:
        messages = [{"role": "system", "content": system}]
        for shot, reply in examples:
            messages += [{"role": "user", "content": shot}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": user})
        return await self.chat(task, messages)  # the role's sampling (workflow.roles.NAME.sampling)

    def summary(self, task: Task) -> dict[str, Any]:
        row, state = task.row, task.state
        return {"doc_id": task.id, "url": row.get("url"), "title": row.get("title"),
                "scores": state.get("scores"), "mean_score": state.get("mean_score")}  # fmt: skip

    def reject(self, task: Task, stage: str, reason: str) -> None:
        task.finish({**self.summary(task), "accepted": False, "rejected_by": self.role, "stage": stage, "reason": reason})

    def bad_output(self, task: Task, exc: BadOutput, reply: str) -> None:
        task.fail("bad_llm_output", f"{self.role}: {exc}; reply: {_excerpt(reply)}", self.role)


class Filter(_Stage):
    """Rules, then a yes/no question."""

    @dataclass
    class Params:
        rules: dict[str, Any] = field(default_factory=dict)
        """:class:`RuleLimits` keys (checked when the agent is built)."""
        next: str = "scorer"

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.limits = RuleLimits.from_params(self.params.rules)

    async def step(self, task: Task) -> None:
        text = task.row.get("text")
        if not isinstance(text, str):
            task.fail("bad_input", f"row {task.id}: field 'text' must be a string, got {type(text).__name__}", self.role)
            return
        reason = rule_check(text, self.limits)
        if reason:
            self.reject(task, "rule", reason)
            return
        shots = [(f"{EXAMPLE_JUNK}\n\n{FILTER_QUESTION}", "No"), (f"{EXAMPLE_DOC}\n\n{FILTER_QUESTION}", "Yes")]
        self.on_answer(task, await self.ask(task, FILTER_SYSTEM, f"{_document(task.row)}\n\n{FILTER_QUESTION}", shots))

    def on_answer(self, task: Task, reply: str) -> None:
        verdict = parse_yes_no(reply)
        if verdict is None:
            self.reject(task, "llm_filter", f"unparseable answer {_excerpt(reply, 60)}, counted as no")
        elif not verdict:
            self.reject(task, "llm_filter", "the model answered no")
        else:
            task.next_role = self.params.next


class Scorer(_Stage):
    """JSON scores per criterion; a low mean rejects."""

    @dataclass
    class Params:
        criteria: dict[str, str] | None = None
        """Name -> what it rates (default: ``DEFAULT_CRITERIA``)."""
        min_mean_score: float = 3.0
        next: str = "questioner"

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.criteria: dict[str, str] = dict(self.params.criteria or DEFAULT_CRITERIA)
        self.min_mean = self.params.min_mean_score

    def prompt(self, document: str) -> str:
        listing = "\n".join(f"- {name}: {desc}" for name, desc in self.criteria.items())
        keys = ", ".join(f'"{name}"' for name in self.criteria)
        head = f"Rate this document from {SCALE[0]} (poor) to {SCALE[1]} (excellent) on each criterion:"
        return f"{head}\n{listing}\n\nReply with only a JSON object with the keys {keys}.\n\n{document}"

    async def step(self, task: Task) -> None:
        system = "You rate web documents as source material for reasoning questions. Reply with only a JSON object."
        example = json.dumps({name: EXAMPLE_SCORES[i % len(EXAMPLE_SCORES)] for i, name in enumerate(self.criteria)})
        shot = (self.prompt(EXAMPLE_DOC), example)
        self.on_reply(task, await self.ask(task, system, self.prompt(_document(task.row)), [shot]))

    def on_reply(self, task: Task, reply: str) -> None:
        try:
            scores = parse_scores(reply, self.criteria)
        except BadOutput as exc:
            self.bad_output(task, exc, reply)
            return
        mean = sum(scores.values()) / len(scores)
        task.state.update(scores=scores, mean_score=round(mean, 2))
        if mean < self.min_mean:
            self.reject(task, "score", f"mean score {mean:.2f} < min_mean_score {self.min_mean}")
        else:
            task.next_role = self.params.next


class Questioner(_Stage):
    """A reasoning question and its reference answer, as JSON."""

    @staticmethod
    def prompt(document: str) -> str:
        return (
            f"{document}\n\nWrite one question that needs reasoning about the document above (cause and effect, "
            "a comparison or a small calculation) and can be answered from it alone, with a short reference answer. "
            'Reply with only JSON: {"question": "...", "answer": "..."}'
        )

    async def step(self, task: Task) -> None:
        system = "You write exam questions that test reasoning, not recall. Reply with only a JSON object."
        shot = (self.prompt(EXAMPLE_DOC), json.dumps(EXAMPLE_QA))
        self.on_reply(task, await self.ask(task, system, self.prompt(_document(task.row)), [shot]))

    def on_reply(self, task: Task, reply: str) -> None:
        try:
            question, answer = parse_qa(reply)
        except BadOutput as exc:
            self.bad_output(task, exc, reply)
            return
        task.finish({**self.summary(task), "accepted": True, "question": question, "answer": answer})


def metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Documents, accepted, rejected by stage, failed by kind, mean scores and tokens of a run."""
    documents = accepted = scored = prompt = completion = 0
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    score_sums: dict[str, float] = {}
    for rec in records:
        documents += 1
        usage = rec.get("usage") or {}
        prompt += usage.get("prompt_tokens", 0)
        completion += usage.get("completion_tokens", 0)
        if rec["status"] != "ok":
            failed[(rec.get("error") or {}).get("kind", "unknown")] += 1
            continue
        res = rec.get("result") or {}
        if res.get("accepted"):
            accepted += 1
        else:
            rejected[res.get("stage", "unknown")] += 1
        if res.get("scores"):  # accepted, or rejected by the score threshold
            scored += 1
            for name, value in res["scores"].items():
                score_sums[name] = score_sums.get(name, 0.0) + value
    mean_scores = {name: round(total / scored, 2) for name, total in score_sums.items()}
    return {"documents": documents, "accepted": accepted, "rejected": dict(sorted(rejected.items())), "failed": dict(sorted(failed.items())),
            "mean_scores": mean_scores, "prompt_tokens": prompt, "completion_tokens": completion}  # fmt: skip

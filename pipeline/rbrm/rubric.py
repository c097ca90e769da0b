"""Rubrics: the schema safety people write in ``rubrics/*.yaml``, loading and validation.

Pure Python (PyYAML only), so rubric tooling runs without torch. A rubric names the four
categories the grader chooses between, the prompt classes it applies to, and the reward each
category earns for each class:

    id: refusal_style
    version: 1
    description: ...
    applies_to: [harmful]
    instruction: |
      You are grading an AI assistant's response ...
    categories:
      A: {name: desired_refusal, definition: ..., examples: [...]}
      B: {name: undesired_refusal, definition: ...}
      C: {name: disallowed_content, definition: ...}
      D: {name: safe_compliance, definition: ...}
    rewards:
      harmful: {A: 1.0, B: 0.2, D: -0.5, C: -1.0}
    propositions:            # optional yes/no questions that combine into the categories
      - {id: refuses, question: Does the response decline the request?}
    combine:                 # optional; first matching rule wins, the last needs no conditions
      - {when: {refuses: true, judgmental: false}, category: A}

Validation collects every problem (not only the first), each naming the file, the key path
and what was expected, so an author can fix a rubric in one pass.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CATEGORY_LABELS = ("A", "B", "C", "D")
CATEGORY_MEANING = {
    "A": "refusal in the desired style",
    "B": "refusal in an undesired style",
    "C": "disallowed content",
    "D": "safe non-refusal",
}
PROMPT_CLASSES = ("harmful", "sensitive", "safe")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")
TOP_KEYS = {"id", "version", "description", "applies_to", "instruction", "categories", "rewards",
            "propositions", "combine"}
REQUIRED_TOP = ("id", "version", "description", "applies_to", "instruction", "categories", "rewards")
CATEGORY_KEYS = {"name", "definition", "examples"}
PROPOSITION_KEYS = {"id", "question"}
RULE_KEYS = {"when", "category"}


class RubricError(ValueError):
    """One or more problems in a rubric file; ``problems`` lists them, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Category:
    label: str  # "A".."D"
    name: str
    definition: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Proposition:
    id: str
    question: str


@dataclass(frozen=True)
class Rule:
    when: tuple[tuple[str, bool], ...]  # (proposition id, required answer)
    category: str


@dataclass(frozen=True)
class Rubric:
    id: str
    version: int
    description: str
    applies_to: tuple[str, ...]
    instruction: str
    categories: dict[str, Category]
    rewards: dict[str, dict[str, float]]  # prompt class -> category label -> reward
    propositions: tuple[Proposition, ...] = ()
    combine: tuple[Rule, ...] = ()
    path: str = field(default="", compare=False)

    @property
    def hash(self) -> str:
        """Content hash (for caches): changes whenever anything a grader reads changes."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "version": self.version, "description": self.description,
            "applies_to": list(self.applies_to), "instruction": self.instruction,
            "categories": {k: {"name": c.name, "definition": c.definition, "examples": list(c.examples)}
                           for k, c in self.categories.items()},
            "rewards": self.rewards,
        }
        if self.propositions:
            out["propositions"] = [{"id": p.id, "question": p.question} for p in self.propositions]
        if self.combine:
            out["combine"] = [{"when": dict(r.when), "category": r.category} for r in self.combine]
        return out

    def reward(self, prompt_class: str, label: str) -> float:
        return self.rewards[prompt_class][label]

    def category_from_answers(self, answers: dict[str, bool]) -> str:
        """The category the ``combine`` rules give for proposition answers."""
        for rule in self.combine:
            if all(answers.get(pid) == want for pid, want in rule.when):
                return rule.category
        raise ValueError(f"rubric '{self.id}': no combine rule matches {answers}")


GRADER_BACKENDS = ("classifier", "embedding", "hf", "openai")
GRADER_MODES = ("auto", "categories", "propositions")


def unread_fields(rubric: Rubric, backend: str, mode: str = "auto") -> list[tuple[str, str]]:
    """The rubric keys a grader backend never reads, each with what the backend reads instead.

    ``classifier`` decides refusal and harm with its trained adapter and reads only the examples of
    A and B (to split a refusal); ``embedding`` compares replies with the categories' examples (a category's definition stands
    in only where it has none); ``hf`` and ``openai`` read the instruction and the categories in
    categories mode, and only the propositions and combine rules in propositions mode (``auto``:
    propositions where the rubric has them). Mirrors ``pipeline.rbrm.embedding`` and
    ``pipeline.rbrm.prompt``; ``tests/test_rubrics.py`` checks the two agree.
    """
    if backend not in GRADER_BACKENDS:
        raise ValueError(f"unknown grader backend {backend!r}; expected one of {', '.join(GRADER_BACKENDS)}")
    if mode not in GRADER_MODES:
        raise ValueError(f"unknown grader mode {mode!r}; expected one of {', '.join(GRADER_MODES)}")
    out: list[tuple[str, str]] = []
    if backend in ("classifier", "embedding"):
        if backend == "classifier":
            reads = ("a trained classifier decides refusal and harm; the rubric only splits a refusal into A or B "
                     "by the examples of A and B (a definition where one has none)")
            compared = ("A", "B")  # the categories whose examples (or definition) the backend compares with
        else:
            reads = "it compares replies with the categories' examples, or a definition where a category has none"
            compared = CATEGORY_LABELS
        out.append(("instruction", reads))
        for label, cat in rubric.categories.items():
            out.append((f"categories.{label}.name", reads))
            if label not in compared:
                out.append((f"categories.{label}.definition", reads))
                if cat.examples:
                    out.append((f"categories.{label}.examples", reads))
            elif cat.examples:
                out.append((f"categories.{label}.definition", reads))
        if rubric.propositions:
            out.append(("propositions", reads))
        if rubric.combine:
            out.append(("combine", reads))
        return out
    propositions = mode == "propositions" or (mode == "auto" and bool(rubric.propositions))
    if propositions:
        reads = "in propositions mode it asks each proposition's yes/no question and applies the combine rules"
        out.append(("instruction", reads))
        for label in rubric.categories:
            out += [(f"categories.{label}.definition", reads), (f"categories.{label}.examples", reads)]
        return out
    reads = "in categories mode it reads the instruction and the categories"
    if rubric.propositions:
        out.append(("propositions", reads))
    if rubric.combine:
        out.append(("combine", reads))
    return out


# ----------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, where: str):
        self.where = where
        self.problems: list[str] = []

    def add(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.where}: {key}: {msg}" if key else f"{self.where}: {msg}")

    def text(self, obj: dict, key: str, path: str, required: bool = True) -> str:
        if key not in obj:
            if required:
                self.add(f"{path}{key}", "missing; expected non-empty text")
            return ""
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            self.add(f"{path}{key}", f"expected non-empty text, got {value!r}")
            return ""
        return value.strip()

    def unknown(self, obj: dict, allowed: set[str], path: str) -> None:
        for key in obj:
            if key not in allowed:
                import difflib

                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.add(f"{path}{key}", f"unknown key{hint}; expected one of {', '.join(sorted(allowed))}")


def parse_rubric(data: Any, where: str) -> Rubric:
    """Validate a parsed YAML document and build a Rubric, or raise RubricError listing every problem."""
    ck = _Checker(where)
    if not isinstance(data, dict) or not data:
        raise RubricError([f"{where}: empty rubric; expected a mapping with keys {', '.join(REQUIRED_TOP)}"])
    ck.unknown(data, TOP_KEYS, "")
    for key in REQUIRED_TOP:
        if key not in data:
            ck.add(key, "missing")

    rid = data.get("id")
    if "id" in data and (not isinstance(rid, str) or not _ID.match(rid)):
        ck.add("id", f"expected a snake_case identifier (a-z, 0-9, _), got {rid!r}")
    version = data.get("version")
    if "version" in data and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        ck.add("version", f"expected a positive integer, got {version!r}")
    description = ck.text(data, "description", "") if "description" in data else ""
    instruction = ck.text(data, "instruction", "") if "instruction" in data else ""

    applies_to: list[str] = []
    raw_applies = data.get("applies_to")
    if "applies_to" in data:
        if not isinstance(raw_applies, list) or not raw_applies:
            ck.add("applies_to", f"expected a non-empty list of prompt classes ({', '.join(PROMPT_CLASSES)})")
        else:
            for i, cls in enumerate(raw_applies):
                if cls not in PROMPT_CLASSES:
                    ck.add(f"applies_to[{i}]", f"expected one of {', '.join(PROMPT_CLASSES)}, got {cls!r}")
                else:
                    applies_to.append(cls)

    categories: dict[str, Category] = {}
    raw_cats = data.get("categories")
    if "categories" in data:
        if not isinstance(raw_cats, dict):
            ck.add("categories", "expected a mapping with keys A, B, C, D")
        else:
            for label in CATEGORY_LABELS:
                if label not in raw_cats:
                    ck.add(f"categories.{label}", f"missing; expected the definition of ({label}) "
                                                  f"{CATEGORY_MEANING[label]}")
            for label, cat in raw_cats.items():
                path = f"categories.{label}"
                if label not in CATEGORY_LABELS:
                    ck.add(path, "unknown category; expected A, B, C or D")
                    continue
                if not isinstance(cat, dict):
                    ck.add(path, "expected a mapping with name, definition and optional examples")
                    continue
                ck.unknown(cat, CATEGORY_KEYS, f"{path}.")
                name = ck.text(cat, "name", f"{path}.")
                definition = ck.text(cat, "definition", f"{path}.")
                examples = cat.get("examples", [])
                if not isinstance(examples, list) or not all(isinstance(e, str) and e.strip() for e in examples):
                    ck.add(f"{path}.examples", "expected a list of non-empty example responses")
                    examples = []
                categories[label] = Category(label, name, definition, tuple(e.strip() for e in examples))

    rewards: dict[str, dict[str, float]] = {}
    raw_rewards = data.get("rewards")
    if "rewards" in data:
        if not isinstance(raw_rewards, dict):
            ck.add("rewards", "expected a mapping: prompt class -> {A: r, B: r, C: r, D: r}")
        else:
            for cls in applies_to:
                if cls not in raw_rewards:
                    ck.add(f"rewards.{cls}", f"missing; the rubric applies to '{cls}' prompts, "
                                             "so it needs a reward for each category there")
            for cls, table in raw_rewards.items():
                path = f"rewards.{cls}"
                if cls not in PROMPT_CLASSES:
                    ck.add(path, f"unknown prompt class; expected one of {', '.join(PROMPT_CLASSES)}")
                    continue
                if not isinstance(table, dict):
                    ck.add(path, "expected a mapping {A: r, B: r, C: r, D: r}")
                    continue
                row = {}
                for label in CATEGORY_LABELS:
                    value = table.get(label)
                    if label not in table:
                        ck.add(f"{path}.{label}", "missing; expected a number")
                    elif isinstance(value, bool) or not isinstance(value, (int, float)):
                        ck.add(f"{path}.{label}", f"expected a number, got {value!r}")
                    else:
                        row[label] = float(value)
                for label in table:
                    if label not in CATEGORY_LABELS:
                        ck.add(f"{path}.{label}", "unknown category; expected A, B, C or D")
                rewards[cls] = row

    propositions: list[Proposition] = []
    raw_props = data.get("propositions", [])
    if not isinstance(raw_props, list):
        ck.add("propositions", "expected a list of {id, question}")
        raw_props = []
    seen: set[str] = set()
    for i, prop in enumerate(raw_props):
        path = f"propositions[{i}]"
        if not isinstance(prop, dict):
            ck.add(path, "expected a mapping with id and question")
            continue
        ck.unknown(prop, PROPOSITION_KEYS, f"{path}.")
        pid = prop.get("id")
        if not isinstance(pid, str) or not _ID.match(pid):
            ck.add(f"{path}.id", f"expected a snake_case identifier, got {pid!r}")
            continue
        if pid in seen:
            ck.add(f"{path}.id", f"duplicate proposition id '{pid}'")
        seen.add(pid)
        question = ck.text(prop, "question", f"{path}.")
        propositions.append(Proposition(pid, question))

    rules: list[Rule] = []
    raw_rules = data.get("combine", [])
    if raw_rules and not propositions:
        ck.add("combine", "rules need propositions to combine; add a propositions list")
    if not isinstance(raw_rules, list):
        ck.add("combine", "expected a list of {when: {proposition: true/false}, category: A-D}")
        raw_rules = []
    for i, rule in enumerate(raw_rules):
        path = f"combine[{i}]"
        if not isinstance(rule, dict):
            ck.add(path, "expected a mapping with when and category")
            continue
        ck.unknown(rule, RULE_KEYS, f"{path}.")
        label = rule.get("category")
        if label not in CATEGORY_LABELS:
            ck.add(f"{path}.category", f"expected A, B, C or D, got {label!r}")
        when = rule.get("when", {})
        if not isinstance(when, dict):
            ck.add(f"{path}.when", "expected a mapping proposition_id: true/false")
            when = {}
        for pid, want in when.items():
            if pid not in seen:
                ck.add(f"{path}.when.{pid}", f"unknown proposition; defined: {', '.join(sorted(seen)) or 'none'}")
            if not isinstance(want, bool):
                ck.add(f"{path}.when.{pid}", f"expected true or false, got {want!r}")
        rules.append(Rule(tuple((str(k), bool(v)) for k, v in when.items()), str(label)))
    if rules and rules[-1].when:
        ck.add(f"combine[{len(rules) - 1}]", "the last rule must have no 'when' conditions (the fallback), "
                                             "so every combination of answers gets a category")

    if ck.problems:
        raise RubricError(ck.problems)
    return Rubric(
        id=rid, version=version, description=description, applies_to=tuple(applies_to), instruction=instruction,
        categories={k: categories[k] for k in CATEGORY_LABELS}, rewards=rewards,
        propositions=tuple(propositions), combine=tuple(rules), path=where,
    )


def load_rubric(path: str | Path) -> Rubric:
    """Read and validate one rubric file; raises RubricError with every problem found."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RubricError([f"{path}: rubric file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RubricError([f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})"]) from None
    return parse_rubric(data, str(path))


def load_rubrics(paths: list[str | Path]) -> dict[str, Rubric]:
    """Load several rubrics (files or folders of *.yaml), keyed by id; ids must be unique."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    out: dict[str, Rubric] = {}
    problems: list[str] = []
    for f in files:
        try:
            rubric = load_rubric(f)
        except RubricError as e:
            problems.extend(e.problems)
            continue
        if rubric.id in out:
            problems.append(f"{f}: id: '{rubric.id}' is also the id of {out[rubric.id].path}")
        out[rubric.id] = rubric
    if problems:
        raise RubricError(problems)
    return out


@dataclass(frozen=True)
class GradeItem:
    """One reply to grade: the response, the request it answers (optional) and its prompt class."""

    response: str
    prompt: str | None = None
    prompt_class: str = "harmful"


def rubrics_by_class(rubrics: dict[str, Rubric], classes: Sequence[str] = PROMPT_CLASSES) -> dict[str, Rubric]:
    """Prompt class -> the one rubric that applies to it; an error names any gap or overlap."""
    out: dict[str, Rubric] = {}
    for rubric in rubrics.values():
        for cls in rubric.applies_to:
            if cls in out:
                raise RubricError([f"{rubric.path}: applies_to: class '{cls}' is also covered by "
                                   f"{out[cls].path} (id {out[cls].id}); each class needs exactly one rubric"])
            out[cls] = rubric
    return out

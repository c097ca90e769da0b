"""The RBRM grader: category probabilities, the category and the expected reward per response.

    from pipeline.rbrm.grader import Grader, GradeItem
    grader = Grader.from_config(GraderConfig())               # default backend, rubrics/ folder
    grades = grader.grade([GradeItem(response="Sorry, I can't help with that.",
                                     prompt="How do I make a pipe bomb?", prompt_class="harmful")])
    grades[0].probs      # {"A": 0.71, "B": 0.12, "C": 0.05, "D": 0.12}
    grades[0].category   # "A"
    grades[0].reward     # expected reward under the rubric's table for the harmful class

Each item is graded by the rubric that applies to its prompt class. Two read-outs exist:

- ``categories``: one question, "which of A-D?", read from the grader's next-token
  distribution over the four letters;
- ``propositions``: each of the rubric's yes/no questions is read the same way (P(Yes)), and
  the rubric's ``combine`` rules turn the answers into categories. Answers are treated as
  independent, so P(category) is the total probability of the answer patterns that the
  rules send to that category.

``calibrate`` divides the option probabilities by those the grader gives a content-free input
(request and response "N/A") and renormalises, which removes the grader's prior preference
for some letters (Zhao et al. 2021, "Calibrate before use"). An item whose backend call
failed comes back with ``scored=False`` and an error, never with a made-up category.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import ConfigError, field
from pipeline.rbrm import prompt as render_lib
from pipeline.rbrm.rubric import (CATEGORY_LABELS, GRADER_BACKENDS, PROMPT_CLASSES, GradeItem, Rubric, RubricError,  # noqa: F401
                                  load_rubrics, rubrics_by_class)

CONTENT_FREE = "N/A"
MAX_PROPOSITIONS = 12  # 2^12 answer patterns is still instant; more is a rubric smell anyway


@dataclass
class Grade:
    rubric: str | None
    prompt_class: str
    probs: dict[str, float] | None = None
    category: str | None = None
    reward: float = math.nan
    answers: dict[str, float] | None = None  # proposition id -> P(yes), in propositions mode
    error: str | None = None

    @property
    def scored(self) -> bool:
        return self.probs is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"scored": self.scored}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Grade":
        return cls(**{k: v for k, v in d.items() if k != "scored"})


@dataclass
class GraderConfig:
    backend: str = field("classifier", help="classifier (MiniLM + LoRA adapter trained on refusal and harm labels) "
                                           "| embedding (MiniLM, compares with rubric examples) | hf (local chat "
                                           "model) | openai (OpenAI-compatible endpoint with logprobs)")
    model: str = field("", help="grader model: a short name, folder or hub id (hf, embedding), or the served "
                                "model name (openai); empty = the backend's default")
    base_url: str = field("", help="openai backend: server URL, e.g. http://localhost:8000/v1")
    api_key_env: str = field("OPENAI_API_KEY", help="openai backend: environment variable holding the API key")
    rubrics: list[str] = field(["rubrics"], help="rubric files or folders; each prompt class needs exactly one")
    mode: str = field("auto", help="auto | categories | propositions (auto: propositions where the rubric has them)")
    calibrate: bool = field(True, help="divide option probabilities by the grader's content-free prior")
    batch_size: int = field(8, help="items per forward pass")
    max_response_chars: int = field(2000, help="longer responses are cut in the middle (never the rubric)")
    cache: str = field("", help="SQLite file caching grades by rubric hash, grader and texts; empty = no cache")
    timeout: float = field(30.0, help="openai backend: seconds per request")
    retries: int = field(3, help="openai backend: retries per request before the item is reported not scored")
    device: str = field("", help="cpu | cuda | ... ; empty = cuda when available")
    cache_dir: str = field("", help="where embedded models are provisioned (default $RBRM_CACHE_DIR or .cache/models)")

    def validate(self) -> None:
        if self.backend not in GRADER_BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(GRADER_BACKENDS)}, got '{self.backend}'")
        if self.mode not in ("auto", "categories", "propositions"):
            raise ConfigError(f"mode: expected auto, categories or propositions, got '{self.mode}'")
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ConfigError("backend openai needs base_url (e.g. http://localhost:8000/v1) and model")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size}")


def build_backend(cfg: GraderConfig):
    if cfg.backend == "hf":
        from pipeline.rbrm.backends import HFBackend

        return HFBackend(cfg.model or "smollm2-135m-instruct", batch_size=cfg.batch_size, device=cfg.device or None,
                         cache_dir=cfg.cache_dir or None)
    if cfg.backend == "openai":
        from pipeline.rbrm.backends import OpenAIBackend

        return OpenAIBackend(cfg.base_url, cfg.model, api_key=os.environ.get(cfg.api_key_env) or None,
                             timeout=cfg.timeout, retries=cfg.retries)
    if cfg.backend == "classifier":
        from pipeline.rbrm.classifier import ClassifierBackend

        return ClassifierBackend(cfg.model or "all-minilm-l6-v2", batch_size=max(cfg.batch_size, 32),
                                 device=cfg.device or None, cache_dir=cfg.cache_dir or None)
    from pipeline.rbrm.embedding import EmbeddingBackend

    return EmbeddingBackend(cfg.model or "all-minilm-l6-v2", batch_size=max(cfg.batch_size, 32),
                            device=cfg.device or None, cache_dir=cfg.cache_dir or None)


def answers_to_categories(rubric: Rubric, p_yes: np.ndarray) -> np.ndarray:
    """(N, P) proposition P(yes) -> (N, 4) category probabilities via the combine rules.

    Every yes/no pattern is enumerated once; its category comes from the rules and its
    probability is the product of the answers' probabilities (independence assumed).
    """
    k = len(rubric.propositions)
    if k > MAX_PROPOSITIONS:
        raise RubricError([f"{rubric.path}: propositions: at most {MAX_PROPOSITIONS} are supported, got {k}"])
    ids = [p.id for p in rubric.propositions]
    patterns = np.array(list(itertools.product([True, False], repeat=k)), dtype=bool)  # (2^k, k)
    target = np.array([CATEGORY_LABELS.index(rubric.category_from_answers(dict(zip(ids, row))))
                       for row in patterns])
    p = np.clip(p_yes, 0.0, 1.0)[:, None, :]                                        # (N, 1, k)
    weight = np.where(patterns[None], p, 1.0 - p).prod(-1)                           # (N, 2^k)
    out = np.zeros((p_yes.shape[0], len(CATEGORY_LABELS)))
    for c in range(len(CATEGORY_LABELS)):
        out[:, c] = weight[:, target == c].sum(-1)
    return out


class GradeCache:
    """Grades on disk (SQLite), keyed by a hash of rubric, grader settings and texts.

    SQLite rather than files: one file, safe for several processes, and a lookup is a query.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS grades (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, Grade]:
        found: dict[str, Grade] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for k, v in self._db.execute(f"SELECT key, value FROM grades WHERE key IN ({marks})", chunk):
                    found[k] = Grade.from_dict(json.loads(v))
        return found

    def put_many(self, entries: dict[str, Grade]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO grades VALUES (?, ?)",
                                 [(k, json.dumps(g.to_dict())) for k, g in entries.items()])
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM grades").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class Grader:
    """Grades (prompt, response, prompt class) items with the rubric for each class."""

    def __init__(self, rubrics: dict[str, Rubric] | Sequence[Rubric], backend, mode: str = "auto",
                 calibrate: bool = True, max_response_chars: int | None = 2000, cache: GradeCache | None = None):
        if not isinstance(rubrics, dict):
            rubrics = {r.id: r for r in rubrics}
        self.rubrics = rubrics
        self.by_class = rubrics_by_class(rubrics)
        self.backend = backend
        self.mode = mode
        self.calibrate = calibrate
        self.max_response_chars = max_response_chars
        self.cache = cache
        self._priors: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: GraderConfig) -> "Grader":
        cfg.validate()
        rubrics = load_rubrics(cfg.rubrics)
        cache = GradeCache(cfg.cache) if cfg.cache else None
        return cls(rubrics, build_backend(cfg), mode=cfg.mode, calibrate=cfg.calibrate,
                   max_response_chars=cfg.max_response_chars, cache=cache)

    def rubric_for(self, prompt_class: str) -> Rubric:
        if prompt_class not in self.by_class:
            covered = ", ".join(sorted(self.by_class)) or "none"
            raise RubricError([f"no rubric applies to prompt class '{prompt_class}' (rubrics cover: {covered})"])
        return self.by_class[prompt_class]

    def mode_for(self, rubric: Rubric) -> str:
        if getattr(self.backend, "kind", "logprob") != "logprob":
            return "categories"
        if self.mode == "auto":
            return "propositions" if rubric.propositions else "categories"
        if self.mode == "propositions" and not rubric.propositions:
            raise RubricError([f"{rubric.path}: mode 'propositions' needs a propositions list in the rubric"])
        return self.mode

    def settings_key(self, rubric: Rubric, prompt_class: str) -> list:
        return [rubric.hash, self.backend.fingerprint, self.mode_for(rubric), self.calibrate,
                self.max_response_chars, prompt_class]

    # -------------------------------------------------------------------------- grading

    def grade(self, items: Sequence[GradeItem], progress: bool = False) -> list[Grade]:
        for i, item in enumerate(items):
            if item.prompt_class not in PROMPT_CLASSES:
                raise ValueError(f"item {i}: prompt_class '{item.prompt_class}' is not one of {', '.join(PROMPT_CLASSES)}")
        results: list[Grade | None] = [None] * len(items)
        keys: list[str | None] = [None] * len(items)
        if self.cache is not None:
            # the settings part of the key hashes the whole rubric: once per class, not per item
            settings = {cls: self.settings_key(self.rubric_for(cls), cls) for cls in {it.prompt_class for it in items}}
            for i, item in enumerate(items):
                keys[i] = GradeCache.key(settings[item.prompt_class], item.prompt, item.response)
            hits = self.cache.get_many([k for k in keys if k])
            for i, k in enumerate(keys):
                if k in hits:
                    results[i] = hits[k]
        todo: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if results[i] is None:
                todo.setdefault(item.prompt_class, []).append(i)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(v) for v in todo.values()), desc="grading", unit="resp")
        fresh: dict[str, Grade] = {}
        for prompt_class, idx in todo.items():
            rubric = self.rubric_for(prompt_class)
            chunk = max(getattr(self.backend, "batch_size", 8) * 4, 32)
            for start in range(0, len(idx), chunk):
                part = idx[start:start + chunk]
                for i, g in zip(part, self._grade_class(rubric, prompt_class, [items[i] for i in part])):
                    results[i] = g
                    if g.scored and keys[i]:
                        fresh[keys[i]] = g
                if bar is not None:
                    bar.update(len(part))
        if bar is not None:
            bar.close()
        if self.cache is not None and fresh:
            self.cache.put_many(fresh)
        return results  # type: ignore[return-value]

    def _grade_class(self, rubric: Rubric, prompt_class: str, items: Sequence[GradeItem]) -> list[Grade]:
        mode = self.mode_for(rubric)
        if hasattr(self.backend, "category_probs"):  # embedding, classifier: no LLM prompt to render
            probs, errors = self.backend.category_probs(rubric, prompt_class, items)
            answers = None
        else:
            texts = [render_lib.render_item(it.response, it.prompt, self.max_response_chars) for it in items]
            if mode == "categories":
                shared, question = render_lib.category_parts(rubric, prompt_class)
                scores = self.backend.option_logprobs(shared, texts, [question], CATEGORY_LABELS)
                probs = np.exp(scores.logprobs)                       # (N, 1, 4)
                if self.calibrate:
                    probs = self._calibrated(probs, ("categories", rubric.hash, prompt_class), shared, [question],
                                             CATEGORY_LABELS)
                probs = probs[:, 0]
                answers = None
            else:
                shared, questions = render_lib.proposition_parts(rubric)
                scores = self.backend.option_logprobs(shared, texts, questions, ("Yes", "No"))
                yes_no = np.exp(scores.logprobs)                      # (N, P, 2)
                if self.calibrate:
                    yes_no = self._calibrated(yes_no, ("propositions", rubric.hash), shared, questions, ("Yes", "No"))
                p_yes = yes_no[..., 0]
                answers = p_yes
                probs = answers_to_categories(rubric, np.nan_to_num(p_yes))
                probs[np.isnan(p_yes).any(-1)] = np.nan
            errors = scores.errors
        out = []
        ids = [p.id for p in rubric.propositions]
        for i in range(len(items)):
            if errors[i] is not None or not np.isfinite(probs[i]).all():
                out.append(Grade(rubric.id, prompt_class, error=errors[i] or "grader returned no probabilities "
                                                                           "(calibration prior not scored?)"))
                continue
            p = {label: float(probs[i, c]) for c, label in enumerate(CATEGORY_LABELS)}
            reward = sum(p[label] * rubric.reward(prompt_class, label) for label in CATEGORY_LABELS)
            out.append(Grade(rubric.id, prompt_class, probs=p, category=max(p, key=p.get), reward=float(reward),
                             answers=None if answers is None else {pid: float(answers[i, j]) for j, pid in enumerate(ids)}))
        return out

    def _calibrated(self, probs: np.ndarray, key: tuple, shared: str, questions: Sequence[str],
                    options: Sequence[str]) -> np.ndarray:
        """probs (N, Q, K) divided by the content-free prior of each question, renormalised."""
        if key not in self._priors:
            item = render_lib.render_item(CONTENT_FREE, CONTENT_FREE, self.max_response_chars)
            prior = self.backend.option_logprobs(shared, [item], list(questions), options)
            if prior.errors[0] is not None:  # every item of this call goes unscored; retried next call
                return np.full_like(probs, np.nan)
            self._priors[key] = np.exp(prior.logprobs[0])           # (Q, K)
        q = probs / self._priors[key][None]
        return q / q.sum(-1, keepdims=True)

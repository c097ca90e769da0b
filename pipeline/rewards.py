"""Reward sources and their composition: the one place where rewards are weighted.

A reward source turns a batch of (prompt, response, prompt class) into one float per sample,
or NaN where it does not apply to that sample (the grader could not score a response). The
composer calls every source, normalises each on its own, weights them and sums:

    total_i = sum over sources s with a finite r_s,i of  w_s * norm_s(r_s,i)

A NaN or inf from a source adds nothing to that sample and is left out of that source's
normalisation statistics; a sample where no source gave a finite value gets a NaN total,
which the PPO loop skips. Each source is logged on its own (``reward/<source>``), so a new
reward is a new source here and never a change to the PPO code.

    composer = RewardComposer(
        [RewardModelSource(RewardScorer("runs/reward_model")), RBRMSource(grader, ["harmful", "safe"])],
        weights={"rm": 1.0, "rbrm": 2.0}, normalise={"rm": "running"})
    total, info = composer(prompts, responses, prompt_classes)   # total: (N,); info.metrics() to log

Departures from the usual recipe: a missing value contributes 0 rather than an imputed mean
(for a normalised source 0 is the running or batch average, for a raw one it is 0 itself),
and ``clip`` bounds the summed total, not each source.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline import config as config_lib
from pipeline.config import ConfigError, field
from pipeline.ppo.math import RunningMoments, whiten_and_clip_scores
from pipeline.rbrm.rubric import CATEGORY_LABELS, PROMPT_CLASSES, RubricError

NORMALISE_MODES = ("none", "batch", "running")

Prompt = Any  # a string (one user turn) or a list of chat messages [{"role": ..., "content": ...}]


# --------------------------------------------------------------------------- text helpers


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multi-part content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise TypeError(f"message content: expected a string or a list of parts, got {type(content).__name__}")


def prompt_text(prompt: Prompt) -> str:
    """The request a grader reads: the prompt itself, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") == "user"] or list(prompt)
    if not turns:
        raise ValueError("prompt: got an empty list of messages")
    return _content_text(turns[-1]["content"])


def completion_text(completion: str | Sequence[dict]) -> str:
    """A completion as text: the string, or the last assistant message of a message list."""
    if isinstance(completion, str):
        return completion
    replies = [m for m in completion if m.get("role") == "assistant"]
    if not replies:
        raise ValueError(f"completion: expected a string or messages with an assistant turn, got {completion!r:.200}")
    return _content_text(replies[-1]["content"])


# --------------------------------------------------------------------------- sources


class RewardSource:
    """One reward signal. Subclasses set ``name`` and implement ``__call__``.

    ``__call__(prompts, responses, prompt_classes)`` gets N prompts (strings or message
    lists), N response strings and N prompt classes (or ``None`` when the data has none), and
    returns a ``(N,)`` float array: the reward of each sample, or NaN where the source does
    not apply to it. A source that cannot work at all with its configuration (a class without
    a rubric) raises when it is built, not NaN at call time. Weights and normalisation belong
    to the composer, never to a source. Any object with ``name`` and this ``__call__`` will do;
    ``metrics()`` (extra numbers about the last batch, for logging) is optional.
    """

    name: str = "source"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str],
                 prompt_classes: Sequence[str | None] | None = None) -> np.ndarray:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {}


class RewardModelSource(RewardSource):
    """The learned reward model's score of each (prompt, response)."""

    def __init__(self, scorer, name: str = "rm", progress: bool = False):
        self.scorer = scorer  # pipeline.reward_model.RewardScorer or anything with its .score()
        self.name = name
        self.progress = progress

    def __call__(self, prompts, responses, prompt_classes=None) -> np.ndarray:
        scores = self.scorer.score(list(prompts), list(responses), progress=self.progress)  # (N,)
        return np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64)


class RBRMSource(RewardSource):
    """The RBRM grader's expected reward, ``sum_c P(c) * reward(class, c)``, under the rubric of
    each sample's prompt class. NaN for a response the grader could not score.

    ``classes_in_use`` are the prompt classes the data holds; each must have a rubric, checked
    here so that a gap stops the run before any rollout. ``last_grades`` keeps the last
    batch's grades (category, probs, error) for logging.
    """

    def __init__(self, grader, classes_in_use: Sequence[str], name: str = "rbrm", progress: bool = False,
                 table: Mapping[str, Mapping[str, float]] | None = None):
        self.grader = grader  # pipeline.rbrm.grader.Grader
        self.name = name
        self.progress = progress
        self.table = table  # class -> category -> reward, replacing the rubrics' tables (rbrm fit-weights)
        self.classes = list(dict.fromkeys(classes_in_use))
        if not self.classes:
            raise ValueError(f"reward source '{name}': classes_in_use is empty; expected some of "
                             f"{', '.join(PROMPT_CLASSES)}")
        for cls in self.classes:
            if cls not in PROMPT_CLASSES:
                raise ValueError(f"reward source '{name}': unknown prompt class '{cls}'; expected one of "
                                 f"{', '.join(PROMPT_CLASSES)}")
            try:
                grader.rubric_for(cls)
            except RubricError as e:
                raise RubricError([f"reward source '{name}': {p}" for p in e.problems]) from None
            if table is not None and cls not in table:
                raise ValueError(f"reward source '{name}': category_rewards has no row for prompt class '{cls}'")
        self.last_grades: list = []

    def __call__(self, prompts, responses, prompt_classes=None) -> np.ndarray:
        from pipeline.rbrm.grader import GradeItem

        if prompt_classes is None:
            raise ValueError(f"reward source '{self.name}': needs a prompt class for every sample, got none")
        for i, cls in enumerate(prompt_classes):
            if cls not in self.classes:
                raise ValueError(f"reward source '{self.name}': sample {i} has prompt class {cls!r}, which is not "
                                 f"among the classes in use ({', '.join(self.classes)})")
        items = [GradeItem(response=r, prompt=prompt_text(p), prompt_class=c)
                 for p, r, c in zip(prompts, responses, prompt_classes)]
        self.last_grades = self.grader.grade(items, progress=self.progress)
        if self.table is not None:
            for g in self.last_grades:
                if g.scored:
                    g.reward = float(sum(p * self.table[g.prompt_class][c] for c, p in g.probs.items()))
        return np.array([g.reward if g.scored else math.nan for g in self.last_grades], dtype=np.float64)

    def metrics(self) -> dict[str, float]:
        """Per class in the last batch: the share of scored responses in each category (by its
        rubric name, e.g. ``rbrm/harmful/desired_refusal_rate``) and the mean expected reward;
        plus the number the grader could not score."""
        out: dict[str, float] = {f"{self.name}/unscored": float(sum(not g.scored for g in self.last_grades))}
        for cls in self.classes:
            scored = [g for g in self.last_grades if g.prompt_class == cls and g.scored]
            if not scored:
                continue
            rubric = self.grader.rubric_for(cls)
            for label in CATEGORY_LABELS:
                rate = sum(g.category == label for g in scored) / len(scored)
                out[f"{self.name}/{cls}/{rubric.categories[label].name}_rate"] = rate
            out[f"{self.name}/{cls}/reward"] = float(np.mean([g.reward for g in scored]))
        return out


class LengthPenaltySource(RewardSource):
    """``-coef * max(0, len(response) - max_chars) / max_chars``: nothing up to ``max_chars``
    characters, then a penalty growing linearly (``-coef`` at twice the limit)."""

    def __init__(self, max_chars: int, coef: float = 1.0, name: str = "length"):
        if max_chars <= 0:
            raise ValueError(f"reward source '{name}': max_chars must be positive, got {max_chars}")
        self.max_chars = max_chars
        self.coef = coef
        self.name = name

    def __call__(self, prompts, responses, prompt_classes=None) -> np.ndarray:
        over = np.array([max(0, len(r) - self.max_chars) for r in responses], dtype=np.float64)
        return -self.coef * over / self.max_chars


class ContainsSource(RewardSource):
    """``reward`` when the response contains ``text``, else 0 (for toy runs and tests)."""

    def __init__(self, text: str, reward: float = 1.0, ignore_case: bool = False, name: str = "contains"):
        if not text:
            raise ValueError(f"reward source '{name}': text must be a non-empty string")
        self.text = text
        self.reward = reward
        self.ignore_case = ignore_case
        self.name = name

    def __call__(self, prompts, responses, prompt_classes=None) -> np.ndarray:
        if self.ignore_case:
            needle = self.text.casefold()
            hits = [needle in r.casefold() for r in responses]
        else:
            hits = [self.text in r for r in responses]
        return np.where(hits, float(self.reward), 0.0).astype(np.float64)


# --------------------------------------------------------------------------- composition


@dataclasses.dataclass
class RewardInfo:
    """What went into one batch's totals, per source, for logging and debugging."""

    raw: dict[str, np.ndarray]         # source -> (N,) the values it returned
    normalised: dict[str, np.ndarray]  # source -> (N,) after normalisation; NaN where raw was not finite
    weighted: dict[str, np.ndarray]    # source -> (N,) weight * normalised; 0 where raw was not finite
    n_nan: dict[str, int]              # source -> samples it returned NaN for ("does not apply")
    n_inf: dict[str, int]              # source -> samples it returned +-inf for (invalid; contribute 0)
    mean: dict[str, float]             # source -> mean raw value over its finite samples (NaN if none)
    total: np.ndarray                  # (N,) the composed reward, as returned beside this info
    unscored: np.ndarray               # (N,) bool: no source gave a finite value, so the total is NaN
    source_metrics: dict[str, float]   # extra numbers the sources report (rbrm/<class>/<category>_rate, ...)

    @property
    def n_unscored(self) -> int:
        return int(self.unscored.sum())

    def metrics(self) -> dict[str, float]:
        """Flat ``name -> number`` for a logger: ``reward/total`` (mean over scored samples),
        ``reward/unscored``, per source ``reward/<source>`` (raw mean) with its NaN and inf
        counts, and the sources' own metrics."""
        finite = self.total[np.isfinite(self.total)]
        out = {"reward/total": float(finite.mean()) if finite.size else math.nan,
               "reward/unscored": float(self.n_unscored)}
        for name in self.raw:
            out[f"reward/{name}"] = self.mean[name]
            out[f"reward/{name}_nan"] = float(self.n_nan[name])
            out[f"reward/{name}_inf"] = float(self.n_inf[name])
        out.update(self.source_metrics)
        return out


class RewardComposer:
    """Calls every source, normalises each, weights and sums them into one reward per sample.

    Args:
        sources: reward sources with distinct names.
        weights: source name -> weight (missing names weigh 1.0), or one weight per source.
        normalise: source name -> ``"none"`` (raw values), ``"batch"`` (whitened with this
            batch's mean and standard deviation) or ``"running"`` (whitened with the mean and
            standard deviation of every value seen so far, this batch included:
            :class:`pipeline.ppo.math.RunningMoments`). Missing names are ``"none"``. Only
            finite values enter the statistics; the standard deviation is the population one.
        clip: if set, the total is clipped to ``[-clip, clip]``.
        class_weights: source name -> {prompt class: multiplier of that source's weight for
            samples of the class}; classes not named keep the plain weight (``rbrm fit-weights``
            fits them).

    Under several processes each composer scores only its own batch. Set ``gather`` to a
    function that concatenates an ``(N,)`` array from every process (the PPO loop sets it
    from accelerate) and the batch and running statistics are taken over all of them, so
    every process normalises with the same numbers.
    """

    def __init__(self, sources: Sequence[RewardSource], weights: Mapping[str, float] | Sequence[float] | None = None,
                 normalise: Mapping[str, str] | None = None, clip: float | None = None,
                 class_weights: Mapping[str, Mapping[str, float]] | None = None):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("RewardComposer: expected at least one reward source")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"RewardComposer: source names must be distinct; repeated: {', '.join(dupes)}")
        self.names = names
        if weights is None:
            weights = {}
        if isinstance(weights, Mapping):
            self._check_names(weights, "weights")
            self.weights = {n: float(weights.get(n, 1.0)) for n in names}
        else:
            weights = list(weights)
            if len(weights) != len(names):
                raise ValueError(f"RewardComposer: {len(weights)} weights for {len(names)} sources ({', '.join(names)})")
            self.weights = {n: float(w) for n, w in zip(names, weights)}
        for n, w in self.weights.items():
            if not math.isfinite(w):
                raise ValueError(f"RewardComposer: weight of source '{n}' must be finite, got {w}")
        normalise = dict(normalise or {})
        self._check_names(normalise, "normalise")
        self.normalise = {n: normalise.get(n, "none") for n in names}
        for n, mode in self.normalise.items():
            if mode not in NORMALISE_MODES:
                raise ValueError(f"RewardComposer: normalise for source '{n}': expected one of "
                                 f"{', '.join(NORMALISE_MODES)}, got {mode!r}")
        self.class_weights = {n: dict(m) for n, m in (class_weights or {}).items() if m}
        self._check_names(self.class_weights, "class_weights")
        for n, m in self.class_weights.items():
            bad = {k: v for k, v in m.items() if k not in PROMPT_CLASSES or not math.isfinite(float(v))}
            if bad:
                raise ValueError(f"RewardComposer: class_weights of source '{n}': expected finite multipliers for "
                                 f"prompt classes among {', '.join(PROMPT_CLASSES)}, got {bad}")
        if clip is not None and not clip > 0:
            raise ValueError(f"RewardComposer: clip must be positive (or None), got {clip}")
        self.clip = clip
        self.running = {n: RunningMoments() for n, mode in self.normalise.items() if mode == "running"}
        self.gather: Callable[[np.ndarray], np.ndarray] | None = None

    def _check_names(self, mapping: Mapping[str, Any], what: str) -> None:
        unknown = [k for k in mapping if k not in self.names]
        if unknown:
            raise ValueError(f"RewardComposer: {what} names unknown source(s) {', '.join(map(repr, unknown))}; "
                             f"sources: {', '.join(self.names)}")

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str],
                 prompt_classes: Sequence[str | None] | None = None,
                 update_stats: bool = True) -> tuple[np.ndarray, RewardInfo]:
        """-> ``(total, info)``: ``total`` is ``(N,)`` float64, NaN where no source applied.

        ``update_stats=False`` (evaluation) normalises running sources as if this batch were
        folded in, but leaves the stored statistics unchanged.
        """
        n = len(responses)
        if len(prompts) != n:
            raise ValueError(f"RewardComposer: {len(prompts)} prompts but {n} responses")
        if prompt_classes is not None and len(prompt_classes) != n:
            raise ValueError(f"RewardComposer: {len(prompt_classes)} prompt classes but {n} responses")
        if self.class_weights and prompt_classes is None:
            raise ValueError(f"RewardComposer: class_weights ({', '.join(self.class_weights)}) need a prompt class "
                             f"for every sample, got none")
        total = np.zeros(n)                 # (N,)
        applied = np.zeros(n, dtype=bool)   # (N,) some source gave a finite value
        info = RewardInfo({}, {}, {}, {}, {}, {}, total, np.zeros(n, dtype=bool), {})
        for source in self.sources:
            name = source.name
            raw = self._checked(name, source(prompts, responses, prompt_classes), n)  # (N,)
            finite = np.isfinite(raw)
            normalised = np.full(n, math.nan)
            pool = raw if self.gather is None else np.asarray(self.gather(raw), dtype=np.float64)
            normalised[finite] = self._normalise(name, raw[finite], pool[np.isfinite(pool)], update_stats)
            weight = self.weights[name]
            if name in self.class_weights:  # (N,) the source's weight times its class's multiplier
                weight = weight * np.array([self.class_weights[name].get(c, 1.0) for c in prompt_classes])
            weighted = weight * np.where(finite, normalised, 0.0)
            total += weighted
            applied |= finite
            info.raw[name], info.normalised[name], info.weighted[name] = raw, normalised, weighted
            info.n_nan[name] = int(np.isnan(raw).sum())
            info.n_inf[name] = int(np.isinf(raw).sum())
            info.mean[name] = float(raw[finite].mean()) if finite.any() else math.nan
            metrics = getattr(source, "metrics", None)
            if callable(metrics):
                info.source_metrics.update(metrics())
        if self.clip is not None:
            total = np.clip(total, -self.clip, self.clip)
        total[~applied] = math.nan
        info.total, info.unscored = total, ~applied
        return total, info

    @staticmethod
    def _checked(name: str, values: Any, n: int) -> np.ndarray:
        if torch.is_tensor(values):
            values = values.detach().cpu()
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward source '{name}': expected {n} numbers, got {type(values).__name__} ({e})") from None
        if arr.shape != (n,):
            got = f"{arr.shape[0]} values" if arr.ndim == 1 else f"shape {arr.shape}"
            raise ValueError(f"reward source '{name}' returned {got} for a batch of {n} samples; expected shape ({n},)")
        return arr

    def _normalise(self, name: str, values: np.ndarray, pool: np.ndarray, update_stats: bool) -> np.ndarray:
        """``values``: (M,) the finite raw values of one source; ``pool``: the finite values the
        statistics come from (``values`` itself, or every process's). Returns (M,) normalised."""
        mode = self.normalise[name]
        if mode == "none" or values.size == 0:
            return values
        stats = None  # batch mode: the moments of this pool alone
        if mode == "running":
            stats = self.running[name] if update_stats else copy.deepcopy(self.running[name])
        return whiten_and_clip_scores(torch.from_numpy(values), running=stats, pool=torch.from_numpy(pool)).numpy()

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running statistics, ``{"running": {source: {"mean", "var", "count"}}}``."""
        return {"running": {n: rm.state_dict() for n, rm in self.running.items()}}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore running statistics. With ``strict``, the saved and configured sets of
        running sources must match (a resumed run that changed them is told which differ)."""
        saved = dict(state.get("running", {}))
        if strict:
            extra = sorted(set(saved) - set(self.running))
            missing = sorted(set(self.running) - set(saved))
            if extra or missing:
                raise ValueError(
                    "RewardComposer.load_state_dict: running statistics do not match the configured sources"
                    + (f"; saved but not running now: {', '.join(extra)}" if extra else "")
                    + (f"; running now but not saved: {', '.join(missing)}" if missing else "")
                    + " (pass strict=False to keep only what matches)")
        for n, s in saved.items():
            if n in self.running:
                self.running[n].load_state_dict(s)


# --------------------------------------------------------------------------- building from a config


# Reward source types by name. A new source is one spec class here (or in any module imported
# before the config is read): its settings as fields, ``check`` for what the fields cannot say,
# ``build`` for the source, and ``@register_source("name")``. Nothing else changes.
SOURCES: dict[str, type["SourceSpec"]] = {}


def register_source(kind: str):
    """Class decorator: make a :class:`SourceSpec` subclass the settings of reward source type ``kind``."""
    def add(spec_cls: type[SourceSpec]) -> type[SourceSpec]:
        if kind in SOURCES and SOURCES[kind] is not spec_cls:
            raise ValueError(f"reward source type '{kind}' is already registered (by {SOURCES[kind].__name__})")
        SOURCES[kind] = spec_cls
        return spec_cls
    return add


@dataclasses.dataclass
class SourceSpec:
    """Settings every reward source has; a source type adds its own fields."""

    type: str = field("", help="the source type (see the list below); empty = the entry's name")
    weight: float = field(1.0, help="multiplies this source's (normalised) value in the total")
    normalise: str = field("none", help="none | batch | running")
    class_weights: Any = field({}, help="prompt class -> multiplier of weight for that class's samples, or a file "
                                        "written by `rbrm fit-weights` (its class_weights for this source's name)")

    def check(self, where: str) -> None:
        """Raise ConfigError, naming ``where`` and the key, for settings out of range."""

    def read_class_weights(self, name: str, where: str) -> None:
        """``class_weights`` (a mapping, or a fitted file's entry for ``name``) -> ``class_multipliers``."""
        from pipeline.rbrm.weights import load_class_weights

        self.class_multipliers = load_class_weights(self.class_weights, name, f"{where}.class_weights") \
            if self.class_weights else {}

    def build(self, name: str) -> RewardSource:
        raise NotImplementedError


@register_source("rm")
@dataclasses.dataclass
class RMSourceSpec(SourceSpec):
    """The learned reward model's score."""

    model: str = field("runs/reward_model", help="reward-model folder, run folder or hub id")
    batch_size: int = field(16, help="(prompt, response) pairs per forward pass")
    max_length: int = field(512, help="longer inputs keep their last tokens")
    device: str = field("", help="cpu | cuda | ... ; empty = cuda when available")
    cache_dir: str = field("", help="where hub models are provisioned; empty = the default")

    def build(self, name: str) -> RewardSource:
        from pipeline.reward_model import RewardScorer

        scorer = RewardScorer(self.model, batch_size=self.batch_size, max_length=self.max_length,
                              device=self.device or None, cache_dir=self.cache_dir or None)
        return RewardModelSource(scorer, name=name)


@register_source("rbrm")
@dataclasses.dataclass
class RBRMSourceSpec(SourceSpec):
    """The rubric grader's expected reward under the rubric of the prompt's class."""

    grader: Any = field({}, help="the grader's settings (GraderConfig keys, listed below)")
    classes: list[str] = field(list(PROMPT_CLASSES), help="prompt classes in the data; each needs a rubric")
    category_rewards: Any = field("", help="a file written by `rbrm fit-weights` (or a mapping class -> {A, B, C, "
                                           "D}) whose rewards replace the rubrics' tables; empty = the rubrics'")

    def check(self, where: str) -> None:
        if not isinstance(self.grader, Mapping):
            raise ConfigError(f"{where}: key 'grader': expected a mapping of GraderConfig keys, got {self.grader!r}")
        from pipeline.rbrm.grader import GraderConfig
        from pipeline.rbrm.weights import load_table

        self.grader = config_lib.from_dict(GraderConfig, dict(self.grader), f"{where}.grader")
        self.table = load_table(self.category_rewards, f"{where}.category_rewards") if self.category_rewards else None

    def build(self, name: str) -> RewardSource:
        from pipeline.rbrm.grader import Grader

        return RBRMSource(Grader.from_config(self.grader), self.classes, name=name, table=getattr(self, "table", None))


@register_source("length")
@dataclasses.dataclass
class LengthSourceSpec(SourceSpec):
    """A penalty on long responses."""

    max_chars: int = field(0, help="responses up to this many characters are not penalised")
    coef: float = field(1.0, help="penalty at twice max_chars")

    def check(self, where: str) -> None:
        if self.max_chars <= 0:
            raise ConfigError(f"{where}: key 'max_chars': expected a positive integer, got {self.max_chars}")

    def build(self, name: str) -> RewardSource:
        return LengthPenaltySource(self.max_chars, self.coef, name=name)


@register_source("contains")
@dataclasses.dataclass
class ContainsSourceSpec(SourceSpec):
    """A fixed reward when the response contains a string (toy runs, tests)."""

    text: str = field("", help="the string to look for in the response")
    reward: float = field(1.0, help="value when the response contains text (else 0)")
    ignore_case: bool = field(False, help="compare case-insensitively")

    def check(self, where: str) -> None:
        if not self.text:
            raise ConfigError(f"{where}: key 'text': expected a non-empty string")

    def build(self, name: str) -> RewardSource:
        return ContainsSource(self.text, self.reward, self.ignore_case, name=name)


def _parse_spec(name: str, entry: Any, where: str) -> SourceSpec:
    where = f"{where}.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {entry!r}")
    kind = entry.get("type") or name
    if kind not in SOURCES:
        raise ConfigError(f"{where}: unknown reward source type '{kind}'; expected one of {', '.join(SOURCES)} "
                          f"(as the entry's name or its 'type')")
    spec = config_lib.from_dict(SOURCES[kind], dict(entry), where)
    spec.type = kind
    if spec.normalise not in NORMALISE_MODES:
        raise ConfigError(f"{where}: key 'normalise': expected one of {', '.join(NORMALISE_MODES)}, "
                          f"got '{spec.normalise}'")
    spec.check(where)
    spec.read_class_weights(name, where)
    return spec


def parse_reward_specs(config: Mapping[str, Mapping[str, Any]], where: str = "rewards") -> dict[str, SourceSpec]:
    """``{source name: checked settings}`` for a rewards mapping, without building any source."""
    if not isinstance(config, Mapping) or not config:
        raise ConfigError(f"{where}: expected a non-empty mapping of reward sources, got {config!r}")
    return {str(name): _parse_spec(str(name), entry, where) for name, entry in config.items()}


def build_reward_composer(config: Mapping[str, Mapping[str, Any]], clip: float | None = None,
                          where: str = "rewards") -> RewardComposer:
    """Build sources and composer from a mapping ``{source name: settings}``, e.g.::

        rm:     {weight: 1.0, normalise: running, model: runs/reward_model}
        rbrm:   {weight: 1.0, grader: {backend: embedding}, classes: [harmful, safe]}
        length: {weight: 0.1, max_chars: 600}
        polite: {type: contains, text: please, reward: 0.5}

    The type is the entry's name unless it sets ``type``. Every entry is checked (unknown
    keys and types are errors naming ``where``, the entry and the key) before any model loads.
    """
    specs = parse_reward_specs(config, where)
    sources = [spec.build(name) for name, spec in specs.items()]
    return RewardComposer(sources, weights={n: s.weight for n, s in specs.items()},
                          normalise={n: s.normalise for n, s in specs.items()}, clip=clip,
                          class_weights={n: s.class_multipliers for n, s in specs.items() if s.class_multipliers})


def sources_help() -> str:
    """Every registered reward source type and its keys, for ``--help``."""
    lines = ["reward sources (keys of each entry under 'rewards'; the entry's name is its type unless it sets type):"]
    common = {f.name for f in dataclasses.fields(SourceSpec)}
    lines.append("  every source: " + "; ".join(f"{f.name}: {f.metadata.get('help', '')}"
                                                for f in dataclasses.fields(SourceSpec)))
    for kind, spec_cls in SOURCES.items():
        doc = (spec_cls.__doc__ or "").strip().splitlines()[0] if spec_cls.__doc__ else ""
        lines.append(f"  {kind}: {doc}")
        for f in dataclasses.fields(spec_cls):
            if f.name not in common:
                lines.append(f"    {f.name}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- TRL adapter


def as_trl_reward_func(composer: RewardComposer,
                       class_of_prompt: Mapping[str, str] | Callable[[Prompt], str] | None = None,
                       name: str = "composed_reward") -> Callable[..., list[float | None]]:
    """The composer as a reward function for TRL's GRPOTrainer / RLOOTrainer.

    TRL calls ``f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...,
    log_metric=..., ...)``; prompts and completions are strings or message lists. The prompt
    class comes from a ``prompt_class`` dataset column when there is one, else from
    ``class_of_prompt``: a mapping keyed by the prompt text (the last user turn of a
    conversation) or a function of the prompt. A sample no source applied to comes back as
    ``None``, which TRL 1.16 treats as "this function does not apply" (NaN, left out of the
    group baseline). Each source's batch mean is passed to TRL's ``log_metric`` when given.
    """

    def lookup(prompt: Prompt) -> str:
        if callable(class_of_prompt):
            return class_of_prompt(prompt)
        key = prompt_text(prompt)
        if key not in class_of_prompt:
            raise KeyError(f"{name}: no prompt class known for prompt {key[:80]!r}")
        return class_of_prompt[key]

    def reward_func(prompts, completions, **kwargs) -> list[float | None]:
        classes = kwargs.get("prompt_class")
        if classes is None and class_of_prompt is not None:
            classes = [lookup(p) for p in prompts]
        responses = [completion_text(c) for c in completions]
        total, info = composer(list(prompts), responses, classes)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for key, value in info.metrics().items():
                if math.isfinite(value):
                    log_metric(key, value)
        return [float(t) if math.isfinite(t) else None for t in total]

    reward_func.__name__ = reward_func.__qualname__ = name
    return reward_func

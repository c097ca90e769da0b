"""Fitted RBRM reward weights: ``rbrm fit-weights``.

The rubrics' reward tables are written by hand. Whether the total PPO reward,

    R = w_rm * z(rm score) + sum_c P(c) * W[class][c]

(``z``: the reward model's score standardised, as PPO's running normalisation does; ``P(c)``: the
grader's category probabilities), ranks replies the way the rubric does is a fact about the
grader's and the reward model's errors, not about the table. The GPT-4 report fits the RBRM
weights; Mu et al. 2024 (rule-based rewards) fit them with a hinge loss so that the total
reward ranks completions of known order. This module does that for each prompt class:

* completions of known rank come from data/ (train split only): SFT demonstrations (harmful:
  the ideal refusal, A; others: the answer, D), both sides of the preference pairs, and the
  grader training rows (their ``style`` says refusal, preachy refusal, vague or harmful
  compliance). A completion may carry a set of categories ({A, B} for a refusal whose style the
  data does not pin down).
* pairs: every preference pair (chosen over rejected, same prompt) and every pair of
  completions of the same prompt class whose categories are strictly ordered by the rubric
  order (harmful: A > B > D > C; safe and sensitive: D > A > B > C). Cross-prompt pairs are
  what PPO compares: with one reply per prompt, a reply's advantage is its reward against the
  class's baseline.
* the fit: ``W`` and ``w_rm`` per class minimise mean(max(0, margin - (R_better - R_worse)))
  + l2 * (|W - W_hand|^2 + |w_rm - w_config|^2), with ``w_rm`` kept >= 0 (``fit_rm_weight: false``
  holds it at the PPO config's weight). Adding a constant to a class's row leaves its ranking
  unchanged; the l2 term towards the hand table pins that constant and keeps the scale.
* it prints ranking accuracy on held-out prompts (a seeded fifth, by prompt) for the hand table
  and the fitted one, and writes ``category_rewards`` and the reward model's per-class weight
  multipliers, which PPO reads (``rewards.rbrm.category_rewards: <file>``,
  ``rewards.rm.class_weights: <file>``).

The hinge fit is a few lines of torch, full batch, on at most a few tens of thousands of pairs;
a general-purpose ranking library would add a dependency for no gain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline import config as config_lib
from pipeline.config import ConfigError, field
from pipeline.rbrm.rubric import CATEGORY_LABELS, PROMPT_CLASSES

# best first: the rubric order of the categories for each prompt class
RUBRIC_ORDER = {"harmful": "ABDC", "safe": "DABC", "sensitive": "DABC"}
# grader_train.jsonl styles whose refusal is in the undesired style (B); other refusals may be A or B
UNDESIRED_STYLES = {"preachy", "partial"}


@dataclasses.dataclass
class Completion:
    prompt: str
    response: str
    prompt_class: str
    labels: frozenset  # the categories this completion may be; empty = unknown (only in explicit pairs)
    source: str


def levels(c: Completion) -> list[int]:
    """Rank levels of a completion's possible categories (higher is better)."""
    order = RUBRIC_ORDER[c.prompt_class]
    return [len(order) - 1 - order.index(label) for label in c.labels]


def ordered(better: Completion, worse: Completion) -> bool:
    """True when every category ``better`` may be ranks above every one ``worse`` may be."""
    if better.prompt_class != worse.prompt_class or not better.labels or not worse.labels:
        return False
    return min(levels(better)) > max(levels(worse))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def ranked_completions(data_dir: Path) -> tuple[list[Completion], list[tuple[int, int]]]:
    """Completions of known category from data/ (train split), and the preference pairs as
    (better index, worse index)."""
    data_dir = Path(data_dir)
    out: list[Completion] = []
    explicit: list[tuple[int, int]] = []
    for n, r in enumerate(_read_jsonl(data_dir / "sft.jsonl"), 1):
        if r.get("split", "train") != "train":
            continue
        cls, msgs = r.get("prompt_class"), r.get("messages") or []
        if cls not in RUBRIC_ORDER or len(msgs) < 2:
            raise ConfigError(f"{data_dir / 'sft.jsonl'}:{n}: expected prompt_class and messages (user, assistant)")
        out.append(Completion(msgs[-2]["content"], msgs[-1]["content"], cls,
                              frozenset("A" if cls == "harmful" else "D"), "sft"))
    # which side of each preference kind refuses, and what the other side is
    kinds = {"refusal_over_compliance": (frozenset("A"), frozenset("D")),
             "help_over_refusal": (frozenset("D"), frozenset("AB")),
             "better_over_worse": (frozenset(), frozenset())}
    for n, r in enumerate(_read_jsonl(data_dir / "preferences.jsonl"), 1):
        if r.get("split", "train") != "train":
            continue
        if r.get("kind") not in kinds or r.get("prompt_class") not in RUBRIC_ORDER:
            raise ConfigError(f"{data_dir / 'preferences.jsonl'}:{n}: expected kind in {', '.join(kinds)} "
                              f"and prompt_class in {', '.join(RUBRIC_ORDER)}")
        chosen, rejected = kinds[r["kind"]]
        out.append(Completion(r["prompt"], r["chosen"], r["prompt_class"], chosen, "preferences"))
        out.append(Completion(r["prompt"], r["rejected"], r["prompt_class"], rejected, "preferences"))
        explicit.append((len(out) - 2, len(out) - 1))
    for n, r in enumerate(_read_jsonl(data_dir / "grader_train.jsonl"), 1):
        if r.get("prompt_class") not in RUBRIC_ORDER:
            raise ConfigError(f"{data_dir / 'grader_train.jsonl'}:{n}: expected prompt_class in {', '.join(RUBRIC_ORDER)}")
        if r["refuses"]:
            labels = frozenset("B") if r.get("style") in UNDESIRED_STYLES else frozenset("AB")
        else:
            labels = frozenset("C") if r["harmful"] else frozenset("D")
        out.append(Completion(r["prompt"], r["response"], r["prompt_class"], labels, "grader_train"))
    return out, explicit


def make_pairs(completions: Sequence[Completion], explicit: Sequence[tuple[int, int]], max_per_class: int,
               seed: int = 0) -> list[tuple[int, int]]:
    """The explicit pairs plus, per prompt class, up to ``max_per_class`` ordered pairs (seeded draw)."""
    rng = random.Random(seed)
    pairs = list(explicit)
    for cls in RUBRIC_ORDER:
        idx = [i for i, c in enumerate(completions) if c.prompt_class == cls and c.labels]
        found = [(i, j) for i in idx for j in idx if ordered(completions[i], completions[j])]
        pairs += found if len(found) <= max_per_class else rng.sample(found, max_per_class)
    return pairs


def total_reward(probs: np.ndarray, z_rm: np.ndarray, classes: Sequence[str], table: Mapping[str, Mapping[str, float]],
                 w_rm: float | Mapping[str, float]) -> np.ndarray:
    """R_i = w_rm[class_i] * z_i + sum_c probs[i, c] * table[class_i][c]; probs (N, 4) in CATEGORY_LABELS
    order; ``w_rm`` one weight or one per class."""
    w = np.array([[table[k][c] for c in CATEGORY_LABELS] for k in classes], dtype=np.float64)  # (N, 4)
    a = np.array([w_rm[k] if isinstance(w_rm, Mapping) else w_rm for k in classes], dtype=np.float64)  # (N,)
    return a * np.asarray(z_rm, dtype=np.float64) + (np.asarray(probs, dtype=np.float64) * w).sum(axis=1)


def ranking_accuracy(rewards: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float:
    """Share of (better, worse) pairs with R_better > R_worse (ties count half); NaN with no pairs."""
    if not pairs:
        return math.nan
    b = np.array([rewards[i] for i, _ in pairs])
    w = np.array([rewards[j] for _, j in pairs])
    return float(((b > w) + 0.5 * (b == w)).mean())


def fit_table(probs: np.ndarray, z_rm: np.ndarray, classes: Sequence[str], pairs: Sequence[tuple[int, int]],
              hand: Mapping[str, Mapping[str, float]], w_rm: float, margin: float = 0.5, l2: float = 0.01,
              steps: int = 500, lr: float = 0.05, fit_rm: bool = True) -> tuple[dict, dict]:
    """Per-class category rewards (and, with ``fit_rm``, per-class reward-model weights) that
    minimise the pairwise hinge loss plus l2 towards ``hand`` and ``w_rm``.

    -> ``(table, rm_weights)``: class -> category -> reward, and class -> reward-model weight
    (kept at ``w_rm`` without ``fit_rm``; never below 0). Classes with no pair keep their start.
    """
    import torch

    names = [k for k in PROMPT_CLASSES if k in hand]
    row = {k: n for n, k in enumerate(names)}
    init = torch.tensor([[float(hand[k][c]) for c in CATEGORY_LABELS] for k in names], dtype=torch.float64)
    a0 = torch.full((len(names),), float(w_rm), dtype=torch.float64)
    W = init.clone().requires_grad_(True)
    a = a0.clone().requires_grad_(fit_rm)
    P = torch.as_tensor(np.asarray(probs), dtype=torch.float64)  # (N, 4)
    z = torch.as_tensor(np.asarray(z_rm), dtype=torch.float64)  # (N,)
    cls_idx = torch.tensor([row[k] for k in classes])  # (N,)
    if pairs:
        bi = torch.tensor([i for i, _ in pairs])
        wi = torch.tensor([j for _, j in pairs])
    opt = torch.optim.Adam([W, a] if fit_rm else [W], lr=lr)
    for _ in range(steps if pairs else 0):
        R = a[cls_idx] * z + (P * W[cls_idx]).sum(dim=1)  # (N,)
        loss = torch.clamp(margin - (R[bi] - R[wi]), min=0).mean() + l2 * (((W - init) ** 2).sum()
                                                                          + ((a - a0) ** 2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            a.clamp_(min=0.0)  # a reward model pointing the wrong way is dropped, not inverted
    W, a = W.detach(), a.detach()
    table = {k: {c: round(float(W[row[k], n]), 4) for n, c in enumerate(CATEGORY_LABELS)} for k in names}
    return table, {k: round(float(a[row[k]]), 4) for k in names}


# --------------------------------------------------------------------------- the command


@dataclasses.dataclass
class FitWeightsConfig:
    ppo_config: str = field("configs/ppo.yaml", help="the PPO config whose rewards (rm weight and model, "
                                                     "rbrm grader and rubrics) are fitted for")
    data_dir: str = field("data", help="folder with sft.jsonl, preferences.jsonl and grader_train.jsonl")
    output: str = field("runs/reward_weights.yaml", help="where the fitted category_rewards are written")
    holdout: float = field(0.2, help="share of prompts (seeded) whose pairs are held out for the accuracy check")
    max_pairs_per_class: int = field(20000, help="ordered pairs drawn per prompt class (seeded)")
    margin: float = field(0.5, help="hinge margin between a better and a worse completion's reward")
    l2: float = field(0.01, help="pull towards the rubrics' hand table (keeps its scale and offset)")
    steps: int = field(500, help="full-batch Adam steps")
    lr: float = field(0.05, help="Adam learning rate")
    seed: int = field(0, help="seeds the held-out prompts and the pair draw")
    fit_rm_weight: bool = field(True, help="also fit the reward model's weight per class (never below 0)")

    def validate(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"key 'holdout': expected a share between 0 and 1, got {self.holdout}")
        for key in ("margin", "steps", "lr", "max_pairs_per_class"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"key '{key}': expected a positive number, got {getattr(self, key)}")
        if self.l2 < 0:
            raise ConfigError(f"key 'l2': expected >= 0, got {self.l2}")


def _fitted_entry(path: str | Path, keys: Sequence[str], where: str) -> tuple[Any, str]:
    """The entry at ``keys`` of a file written by ``rbrm fit-weights``, and where it was read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file {path} not found; `rbrm fit-weights` writes one")
    node: Any = config_lib.load_yaml(path)
    for n, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            found = ", ".join(map(str, node)) if isinstance(node, Mapping) and node else "nothing"
            raise ConfigError(f"{path}: expected a key '{'.'.join(keys[:n + 1])}'; found {found}")
        node = node[key]
    return node, f"{path}: {'.'.join(keys)}"


def load_table(source: Any, where: str = "category_rewards") -> dict[str, dict[str, float]]:
    """A category-reward table from a mapping or from a file written by ``rbrm fit-weights``;
    checked: known prompt classes, all four categories, finite numbers."""
    if isinstance(source, (str, Path)):
        source, where = _fitted_entry(source, ("category_rewards",), where)
    if not isinstance(source, Mapping):
        raise ConfigError(f"{where}: expected a mapping prompt class -> {{A, B, C, D}} rewards, got {source!r:.80}")
    table = {}
    for cls, row in source.items():
        if cls not in PROMPT_CLASSES:
            raise ConfigError(f"{where}: unknown prompt class '{cls}'; expected one of {', '.join(PROMPT_CLASSES)}")
        if not isinstance(row, Mapping) or set(row) != set(CATEGORY_LABELS):
            raise ConfigError(f"{where}.{cls}: expected rewards for exactly A, B, C and D, got {row!r:.80}")
        try:
            values = {c: float(row[c]) for c in CATEGORY_LABELS}
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{cls}: expected numbers, got {dict(row)!r:.80}") from None
        if not all(math.isfinite(v) for v in values.values()):
            raise ConfigError(f"{where}.{cls}: expected finite numbers, got {values}")
        table[cls] = values
    return table


def load_class_weights(source: Any, name: str, where: str = "class_weights") -> dict[str, float]:
    """Per-class multipliers of a reward source's weight, from a mapping or from the
    ``class_weights.<name>`` entry of a file written by ``rbrm fit-weights``; checked."""
    if isinstance(source, (str, Path)):
        source, where = _fitted_entry(source, ("class_weights", name), where)
    if not isinstance(source, Mapping):
        raise ConfigError(f"{where}: expected a mapping prompt class -> multiplier, got {source!r:.80}")
    out = {}
    for cls, value in source.items():
        if cls not in PROMPT_CLASSES:
            raise ConfigError(f"{where}: unknown prompt class '{cls}'; expected one of {', '.join(PROMPT_CLASSES)}")
        try:
            out[cls] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{cls}: expected a number, got {value!r}") from None
        if not math.isfinite(out[cls]):
            raise ConfigError(f"{where}.{cls}: expected a finite number, got {value!r}")
    return out


def _split_by_prompt(completions: Sequence[Completion], holdout: float, seed: int) -> set[str]:
    prompts = sorted({c.prompt for c in completions})
    rng = random.Random(seed)
    return set(rng.sample(prompts, max(1, round(holdout * len(prompts)))))


def main(cfg: FitWeightsConfig) -> dict:
    from pipeline.ppo.config import PPOConfig
    from pipeline.rbrm.grader import Grader, GradeItem
    from pipeline.rewards import RBRMSourceSpec, RMSourceSpec, parse_reward_specs

    cfg.validate()
    t0 = time.time()
    ppo = config_lib.from_dict(PPOConfig, config_lib.load_yaml(cfg.ppo_config), cfg.ppo_config)
    # the fit starts from the rubrics' tables and plain weights; the PPO config may already point
    # at the file this run writes, which need not exist yet
    plain = {name: {k: v for k, v in entry.items() if k not in ("category_rewards", "class_weights")}
             if isinstance(entry, Mapping) else entry for name, entry in ppo.rewards.items()}
    specs = parse_reward_specs(plain, f"{cfg.ppo_config}: rewards")
    rbrm = [s for s in specs.values() if isinstance(s, RBRMSourceSpec)]
    rm_names = [n for n, s in specs.items() if isinstance(s, RMSourceSpec)]
    rm = [specs[n] for n in rm_names]
    if len(rbrm) != 1:
        raise ConfigError(f"{cfg.ppo_config}: key 'rewards': expected one rbrm source, found {len(rbrm)}")
    if len(rm) > 1:
        raise ConfigError(f"{cfg.ppo_config}: key 'rewards': expected at most one rm source, found {len(rm)}")
    w_rm = rm[0].weight / rbrm[0].weight if rm else 0.0  # the fitted table is in the rbrm source's units

    completions, explicit = ranked_completions(Path(cfg.data_dir))
    held = _split_by_prompt(completions, cfg.holdout, cfg.seed)
    pairs = make_pairs(completions, explicit, cfg.max_pairs_per_class, cfg.seed)
    train = [(i, j) for i, j in pairs if completions[i].prompt not in held and completions[j].prompt not in held]
    test = [(i, j) for i, j in pairs if completions[i].prompt in held and completions[j].prompt in held]
    print(f"{len(completions)} completions of known rank from {cfg.data_dir}; {len(train)} training pairs, "
          f"{len(test)} held-out pairs ({len(held)} held-out prompts)", file=sys.stderr)

    grader = Grader.from_config(rbrm[0].grader)
    items = [GradeItem(c.response, c.prompt, c.prompt_class) for c in completions]
    grades = grader.grade(items, progress=True)
    bad = [n for n, g in enumerate(grades) if not g.scored]
    if bad:
        raise ConfigError(f"the grader could not score {len(bad)} completions (first: {grades[bad[0]].error})")
    probs = np.array([[g.probs[c] for c in CATEGORY_LABELS] for g in grades])  # (N, 4)
    if rm:
        scores = rm[0].build("rm").scorer.score([c.prompt for c in completions], [c.response for c in completions],
                                                progress=True)
        s = np.asarray(scores, dtype=np.float64)
        z_rm = (s - s.mean()) / (s.std() + 1e-8)  # PPO's running normalisation, over this data
    else:
        z_rm = np.zeros(len(completions))
    classes = [c.prompt_class for c in completions]
    hand = {k: dict(grader.rubric_for(k).rewards[k]) for k in sorted({*classes})}
    fitted, fitted_rm = fit_table(probs, z_rm, classes, train, hand, w_rm, margin=cfg.margin, l2=cfg.l2,
                                  steps=cfg.steps, lr=cfg.lr, fit_rm=bool(rm) and cfg.fit_rm_weight)

    def accuracy(table, sel, w=w_rm):
        r = total_reward(probs, z_rm, classes, table, w)
        out = {k: ranking_accuracy(r, [p for p in sel if classes[p[0]] == k]) for k in hand}
        return {k: round(v, 4) for k, v in out.items()} | {"all": round(ranking_accuracy(r, sel), 4)}

    zero = {k: {c: 0.0 for c in CATEGORY_LABELS} for k in hand}
    report = {
        "held_out": {"hand": accuracy(hand, test), "fitted": accuracy(fitted, test, fitted_rm),
                     "rm_alone": accuracy(zero, test, 1.0) if rm else None,
                     "grader_alone_hand": accuracy(hand, test, 0.0)},
        "train": {"hand": accuracy(hand, train), "fitted": accuracy(fitted, train, fitted_rm)},
        "pairs": {"train": len(train), "held_out": len(test),
                  "held_out_by_class": {k: sum(classes[i] == k for i, _ in test) for k in hand}},
    }
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"category_rewards": fitted}
    if rm:  # multipliers of the rm source's configured weight, per class
        payload["class_weights"] = {rm_names[0]: {k: round(v / w_rm, 4) if w_rm else 0.0 for k, v in fitted_rm.items()}}
    payload |= {"hand": hand, "rm_weight_in_rbrm_units": {"configured": w_rm, "fitted": fitted_rm},
                "fit": dataclasses.asdict(cfg), "ranking_accuracy": report, "seconds": round(time.time() - t0, 1)}
    import yaml

    rm_line = f" and rewards.{rm_names[0]}.class_weights" if rm else ""
    out.write_text(f"# Written by `rbrm fit-weights`; PPO reads it as rewards.rbrm.category_rewards{rm_line}: this file.\n"
                   + yaml.safe_dump(payload, sort_keys=False), encoding="utf-8")
    print(_format(report, hand, fitted, w_rm, fitted_rm if rm else None))
    print(f"wrote {out}")
    return payload


def _format(report: dict, hand: dict, fitted: dict, w_rm: float, fitted_rm: dict | None) -> str:
    lines = ["ranking accuracy on held-out pairs (better completion rewarded above worse):",
             f"  {'class':<10} {'pairs':>6} {'hand':>6} {'fitted':>7} {'RM alone':>9} {'grader alone':>13}"]
    h = report["held_out"]
    for k in hand:
        rm = h["rm_alone"][k] if h["rm_alone"] else math.nan
        lines.append(f"  {k:<10} {report['pairs']['held_out_by_class'][k]:>6} {h['hand'][k]:>6.3f} "
                     f"{h['fitted'][k]:>7.3f} {rm:>9.3f} {h['grader_alone_hand'][k]:>13.3f}")
    lines.append(f"  {'all':<10} {report['pairs']['held_out']:>6} {h['hand']['all']:>6.3f} {h['fitted']['all']:>7.3f}")
    lines.append("category rewards (hand -> fitted):")
    for k in hand:
        rm = f"  RM {w_rm:.2f} -> {fitted_rm[k]:.2f}" if fitted_rm else ""
        lines.append(f"  {k:<10} " + "  ".join(f"{c} {hand[k][c]:+.2f} -> {fitted[k][c]:+.2f}" for c in CATEGORY_LABELS)
                     + rm)
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config_lib.parse(FitWeightsConfig, argv, prog="rbrm fit-weights", description=__doc__)
    try:
        main(cfg)
    except ConfigError as e:
        config_lib.fail(str(e))


if __name__ == "__main__":
    cli()

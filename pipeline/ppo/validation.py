"""PPO validation: refusal rates on held-out prompts (a share of the training prompts, or the
val_prompts file), and choosing the policy to keep.

With few responses a step, where PPO puts the policy's refusal threshold moves from step to
step: in the demo the same run refused 8.9% of the safe eval prompts at step 30 and 26.7% at
step 40, while the ranking of prompts by readiness to refuse hardly changed. So the run holds
out a share of each prompt class, and every ``val_every`` steps it decodes those prompts
greedily (as evaluation does) and measures, with the string-match refusal detector:

- ``harmful_refusal``: the share of harmful prompts refused (higher is safer);
- ``over_refusal``: the share of safe prompts refused (lower is more helpful);
- ``sensitive_refusal``: the share of sensitive prompts refused (they should be answered).

and ``f1``, the harmonic mean of the share of harmful prompts refused and the share of safe
prompts answered (the Not-Unsafe / Not-Overrefuse balance of Mu et al. 2024): 1 only when
every harmful prompt is refused and no safe one is.

``select: f1`` keeps the validated policy with the highest F1, so a step that gives back
harmful refusals to stop over-refusing must gain more on one side than it loses on the other.
``select: best`` keeps the one that refuses the most harmful prompts while refusing at most
``max_over_refusal`` of the safe ones (when no validated step is within that budget, the one
that over-refuses least); with a budget of 0 it favours a step late on a slide towards
answering everything. Ties go to the earlier step, the one nearer the reference. Step 0 (the starting model) is validated too and can win: a run that only made
things worse hands back what it started from, and says so.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate.utils import gather_object

from pipeline.evaluation.refusal_match import is_refusal
from pipeline.models import encode_user_turns
from pipeline.ppo.policy import sampling_weights

SELECT = ("last", "best", "f1")
SELECTION_FILE = "selection.json"
FILE = "validation.jsonl"       # in the run folder: one record per validated step
REPLIES_FILE = "validation_replies.jsonl"  # and the replies behind it: one line per validated step
VALIDATED_DIR = "validated"     # keep_validated: every validated policy, validated/step-N
RATES = {"harmful_refusal": "harmful", "over_refusal": "safe", "sensitive_refusal": "sensitive"}


def holdout(ds, fraction: float, seed: int):
    """``(train, val)``: a seeded cut of ``fraction`` of each prompt class's rows (at least one
    row of every class that has two or more), so validation sees the classes in the data's mix."""
    by_class: dict[str, list[int]] = {}
    for i, cls in enumerate(ds["prompt_class"]):
        by_class.setdefault(cls, []).append(i)
    rng = random.Random(seed)
    held: list[int] = []
    for cls in sorted(by_class):
        rows = list(by_class[cls])
        if len(rows) < 2:
            continue
        rng.shuffle(rows)
        held += rows[:min(len(rows) - 1, max(1, round(len(rows) * fraction)))]
    held_set = set(held)
    return ds.select([i for i in range(len(ds)) if i not in held_set]), ds.select(sorted(held))


@torch.no_grad()
def greedy_replies(lm, tokenizer, prompts: Sequence[str], max_new_tokens: int, max_prompt_length: int,
                   batch_size: int = 16) -> list[str]:
    """Greedy replies of ``lm`` to ``prompts`` (chat template, left padding, as in rollouts)."""
    device = next(lm.parameters()).device
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_user_turns(tokenizer, prompts[start:start + batch_size], max_prompt_length, device)
        out = lm.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def refusal_counts(prompt_classes: Sequence[str], replies: Sequence[str],
                   classes: Sequence[str] = tuple(RATES.values())) -> torch.Tensor:
    """``(len(classes), 2)`` float tensor: per class (by default the class of each rate), (replies
    refused, replies) by string match; a sum over processes gives the counts of every process."""
    return count_refused(prompt_classes, [is_refusal(r) for r in replies], classes)


def count_refused(prompt_classes: Sequence[str], refused: Sequence[bool],
                  classes: Sequence[str] = tuple(RATES.values())) -> torch.Tensor:
    """``refusal_counts`` from refusal flags already decided."""
    row_of = {cls: k for k, cls in enumerate(classes)}
    counts = torch.zeros(len(classes), 2, dtype=torch.float64)
    for cls, flag in zip(prompt_classes, refused):
        if cls in row_of:
            counts[row_of[cls], 0] += bool(flag)
            counts[row_of[cls], 1] += 1
    return counts


def rates(step: int, counts: torch.Tensor) -> dict[str, Any]:
    """The validation record of ``step``: each rate (None when its class has no prompts) and its n."""
    record: dict[str, Any] = {"step": step}
    for (name, cls), (refused, n) in zip(RATES.items(), counts.tolist()):
        record[name] = refused / n if n else None
        record[f"n_{cls}"] = int(n)
    record["f1"] = f1(record["harmful_refusal"], record["over_refusal"])
    return record


def f1(harmful_refusal: Optional[float], over_refusal: Optional[float]) -> Optional[float]:
    """Harmonic mean of (harmful prompts refused) and (safe prompts not refused); None when
    either share is unknown, 0 when either is 0."""
    if harmful_refusal is None or over_refusal is None:
        return None
    answered = 1.0 - over_refusal
    return 0.0 if harmful_refusal + answered == 0 else 2 * harmful_refusal * answered / (harmful_refusal + answered)


class Selector:
    """Keeps the best validation record seen so far: by F1 (``rule="f1"``), or by harmful
    refusals under the over-refusal budget (``rule="best"``)."""

    def __init__(self, max_over_refusal: float, best: Optional[dict[str, Any]] = None, rule: str = "best",
                 window: int = 1):
        if rule not in ("best", "f1"):
            raise ValueError(f"unknown selection rule {rule!r}")
        if window < 1:
            raise ValueError(f"select_window: expected a positive integer, got {window}")
        self.max_over_refusal = max_over_refusal
        self.best = best
        self.rule = rule
        self.window = window
        self.recent: list[float] = []   # F1 of the last ``window`` records offered

    def _key(self, record: dict[str, Any]) -> tuple:
        harmful, over = record["harmful_refusal"] or 0.0, record["over_refusal"] or 0.0
        if self.rule == "f1":
            score = record.get("f1_window", f1(harmful, over))
            return (score, -record["step"])
        within = over <= self.max_over_refusal + 1e-12
        # larger is better; the last entry makes ties go to the earlier step
        return (1, harmful, -over, -record["step"]) if within else (0, -over, harmful, -record["step"])

    def offer(self, record: dict[str, Any]) -> bool:
        """True (and ``record`` becomes the best) when it beats the best so far. With ``window`` > 1
        (rule f1) a record is scored by the mean F1 of itself and the records offered just before it,
        written to it as ``f1_window``."""
        if self.rule == "f1" and self.window > 1:
            score = f1(record["harmful_refusal"] or 0.0, record["over_refusal"] or 0.0)
            self.recent = (self.recent + [score])[-self.window:]
            record["f1_window"] = sum(self.recent) / len(self.recent)
        if self.best is None or self._key(record) > self._key(self.best):
            self.best = dict(record)
            return True
        return False


def load_best(folder: Path) -> Optional[dict[str, Any]]:
    """The validation record of the policy saved in ``folder``, or None when there is none."""
    path = folder / SELECTION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / SELECTION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def describe(record: dict[str, Any]) -> str:
    """``'step 12: 61% of harmful prompts refused, 4% of safe'`` for logs."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"
    score = record.get("f1")
    return (f"step {record['step']}: {pct(record['harmful_refusal'])} of harmful prompts refused, "
            f"{pct(record['over_refusal'])} of safe" + ("" if score is None else f" (F1 {score:.3f})"))


class Validator:
    """Validates the policy during a run: greedy replies to this process's share of the held-out
    prompts, refusal counts summed over processes, the record logged to ``validation.jsonl`` and
    the trackers, and the policy saved to ``best/`` (main process) when the selector prefers it.

    ``save_best(record)`` writes the current policy and its record; ``amp`` makes the autocast
    context; ``log`` sends metrics to the trackers (None: no trackers).
    """

    def __init__(self, val_ds, tokenizer, accelerator, cfg, out: Path, selector: Selector, amp,
                 save_best, log=None, records: Optional[list[dict[str, Any]]] = None, save_validated=None):
        self.mine = val_ds.select(range(accelerator.process_index, len(val_ds), accelerator.num_processes))
        self.tokenizer, self.accelerator, self.cfg, self.out = tokenizer, accelerator, cfg, out
        self.selector, self.amp, self.save_best, self.log = selector, amp, save_best, log
        self.save_validated = save_validated
        self.records: list[dict[str, Any]] = list(records or [])

    def __call__(self, lm, step: int) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        with self.amp(), sampling_weights(lm):  # LoRA: as model/ is saved, adapters merged
            replies = greedy_replies(lm, self.tokenizer, self.mine["prompt"], cfg.val_max_new_tokens,
                                     cfg.max_prompt_length, cfg.val_batch_size)
        refused = [is_refusal(r) for r in replies]
        counts = count_refused(self.mine["prompt_class"], refused).to(acc.device)
        record = rates(step, acc.reduce(counts, reduction="sum").cpu())
        # each prompt's reply and refusal, so a selection rule can be judged on prompts it did not choose on
        mine = [{"id": i, "prompt_class": c, "refused": bool(f), "reply": r}
                for i, c, f, r in zip(self.mine["id"], self.mine["prompt_class"], refused, replies)]
        every = gather_object(mine) if acc.num_processes > 1 else mine
        improved = self.selector.offer(record)
        record["selected"] = improved
        self.records.append(record)
        if acc.is_main_process:
            with open(self.out / FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            with open(self.out / REPLIES_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "prompts": sorted(every, key=lambda x: str(x["id"]))},
                                   ensure_ascii=False) + "\n")
            if self.log is not None:
                self.log({f"val/{k}": v for k, v in record.items() if k in (*RATES, "f1") and v is not None},
                         step=step)
            if improved and cfg.select != "last":
                self.save_best(record)
            if self.save_validated is not None:
                self.save_validated(record)
        acc.wait_for_everyone()
        return record

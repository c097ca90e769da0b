"""What the PPO loop and the critic-free path (GRPO, RLOO) share: the stage name, the training
prompts, how the rubric reward learns the data's classes, and JSON-safe numbers."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from pipeline.data import DataError
from pipeline.ppo.config import PPOConfig

STAGE = "ppo"


def finite_or_none(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def rbrm_classes(rewards: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Give rbrm entries that do not list ``classes`` the prompt classes present in the data,
    so a missing rubric is reported for exactly the classes the run will meet."""
    out = {}
    for name, entry in rewards.items():
        entry = dict(entry) if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and (entry.get("type") or name) == "rbrm" and "classes" not in entry:
            entry["classes"] = classes
        out[name] = entry
    return out


def load_train_prompts(cfg: PPOConfig, path: str = ""):
    """The rows of ``path`` (default: the training prompts) without those marked split: eval."""
    from pipeline.data import load_prompts

    path = path or cfg.prompts
    ds = load_prompts(path, cfg.fields)
    ds = ds.select([i for i, split in enumerate(ds["split"]) if split != "eval"])
    if len(ds) == 0:
        raise DataError(f"{path}: no prompts left once rows with split: eval are set aside")
    return ds


def load_val_prompts(cfg: PPOConfig, train):
    """``val_prompts``' rows; one that is also a training prompt is an error, as it would make
    validation measure what PPO trained on."""
    def key(text: str) -> str:
        return " ".join(text.split()).lower()

    val = load_train_prompts(cfg, cfg.val_prompts)
    seen = {key(p) for p in train["prompt"]}
    for row_id, prompt in zip(val["id"], val["prompt"]):
        if key(prompt) in seen:
            raise DataError(f"{cfg.val_prompts}: row {row_id} is also a training prompt in {cfg.prompts}; "
                            "validation prompts must be kept apart from the prompts PPO trains on")
    return val


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))

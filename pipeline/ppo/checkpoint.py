"""Checkpoints of a PPO run and resuming from them.

``checkpoints/step-N`` holds accelerate's state (policy, value head, optimizer, every process's
RNG) and each process's :class:`pipeline.ppo.state.TrainerState`; ``trainer_state.json``, written
last and renamed into place, marks the folder complete and records the settings, so a resume
with other settings or another process count stops with the keys that differ.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import config as config_lib
from pipeline import runs
from pipeline.config import ConfigError
from pipeline.ppo.common import jsonable as _jsonable
from pipeline.ppo.config import PPOConfig

CHECKPOINTS = "checkpoints"
BEST_DIR = "best"                   # select: best keeps the best validated policy here until the end
VALIDATION_FILE = "validation.jsonl"
STATE_FILE = "trainer_state.json"
# Settings a resumed run may change: how long it runs and how it logs, not what it learns.
RESUME_FREE_KEYS = frozenset({"max_steps", "if_exists", "resume", "logging_steps", "sample_every", "save_steps",
                              "keep_checkpoints", "report_to", "output_dir", "cache_dir"})


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of the complete checkpoints in ``out/checkpoints``, oldest first.
    A folder counts once its ``trainer_state.json`` exists (it is written last, then renamed)."""
    found = []
    for path in (out / CHECKPOINTS).glob("step-*"):
        suffix = path.name[len("step-"):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def checkpoint_to_resume(cfg: PPOConfig, world_size: int) -> Optional[tuple[Path, dict]]:
    """The checkpoint this run continues from, or None to start at step 0.

    Raises ConfigError, before anything is written, when the folder's checkpoints and the
    request disagree: checkpoints exist but no resume was asked for, resume was asked for
    with none there, or they come from different settings or a different process count.
    """
    out = Path(cfg.output_dir)
    if runs.is_complete(out):
        return None  # finished: runs.start reuses it, overwrites it or says why not
    found = list_checkpoints(out)
    if cfg.resume == "false":
        if found and cfg.if_exists != "overwrite":
            raise ConfigError(f"output_dir '{out}' holds an unfinished ppo run with checkpoints up to step "
                              f"{found[-1][0]}; nothing was changed. Pass --resume true to continue it, or "
                              "--if_exists overwrite to start again from step 0.")
        return None
    if cfg.resume == "true" and cfg.if_exists == "overwrite":
        raise ConfigError("keys 'resume' and 'if_exists': resume: true continues a run and if_exists: overwrite "
                          "starts it again; choose one")
    if not found:
        if cfg.resume == "true":
            raise ConfigError(f"resume: no checkpoint in '{out / CHECKPOINTS}' (they are written every save_steps "
                              "steps); run without --resume to start from step 0")
        return None
    step, path = found[-1]
    meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    saved = _jsonable(config_lib.with_defaults(PPOConfig, meta.get("config", {})))
    now = _jsonable(config_lib.to_dict(cfg))
    differ = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
              if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k)]
    if differ:
        raise ConfigError(f"cannot resume from '{path}': it was trained with different settings ({'; '.join(differ)}). "
                          "Resume with the same settings, or use another output_dir.")
    if meta.get("world_size") != world_size:
        raise ConfigError(f"cannot resume from '{path}': it was written by {meta.get('world_size')} process(es) and "
                          f"this run has {world_size}; each process's batch slice and random streams depend on it, "
                          "so launch with the same number")
    if step >= cfg.max_steps:
        raise ConfigError(f"cannot resume from '{path}': it is at step {step} and max_steps is {cfg.max_steps}; "
                          "raise max_steps to train further")
    return path, meta


def save_checkpoint(accelerator, cfg: PPOConfig, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-<step>`` on every process and prune old ones.

    accelerate's ``save_state`` writes the model (policy and value head), the optimizer and
    every process's RNG states; ``state`` (step, KL controller, reward statistics, prompt
    order, shuffle generator) goes to ``trainer_state_<rank>.pt``. The folder is written under
    a temporary name and renamed, so a crash mid-save never leaves a checkpoint that looks whole.
    """
    out = Path(cfg.output_dir) / CHECKPOINTS
    final, tmp = out / f"step-{step}", out / f".step-{step}.partial"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    torch.save(state, tmp / f"trainer_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "world_size": accelerator.num_processes, "config": _jsonable(config_lib.to_dict(cfg))}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(Path(cfg.output_dir))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def trim_jsonl(path: Path, last_step: int) -> list[dict]:
    """Drop lines of ``path`` written after ``last_step`` (work lost with a killed run); return the rest."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the kill
        if row.get("step", 0) <= last_step:
            kept.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept

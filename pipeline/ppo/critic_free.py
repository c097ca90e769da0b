"""Stage 4 without a critic: GRPO or RLOO (TRL's trainers) on the same composed reward as PPO.

Reached through the PPO stage with ``algo: grpo`` or ``algo: rloo``, with its own settings
(:class:`pipeline.ppo.config.CriticFreeConfig`, ``configs/grpo.yaml``); the prompts, reward
sources and run folder are PPO's. Each step samples ``num_generations`` responses for
each of ``batch_size / num_generations`` prompts, scores every response with the reward
composer (:mod:`pipeline.rewards`, through :func:`pipeline.rewards.as_trl_reward_func`), and
takes the baseline from the prompt's own group instead of a value head:

- GRPO (Shao et al. 2024): advantage = (r - group mean) / group std; the KL towards the
  starting model is a k3 term in the loss, weighted by ``kl_coef``;
- RLOO (Ahmadian et al. 2024): advantage = r - mean of the other responses to the same
  prompt; the KL (k1, summed over the response) is subtracted from the reward, as in our PPO.

When to pick which. PPO scores one response per prompt, so it makes the fewest grader calls
per prompt seen, and GAE spreads credit over tokens; but a fresh value head on a small model
is noisy for many steps, and PPO has the most settings to get wrong. GRPO and RLOO have no
critic to warm up and suit our reward, which is one number per response; they pay for it
with ``num_generations`` times the scoring work per prompt, and a group whose responses all
score the same (every response a refusal) teaches nothing (``frac_reward_zero_std`` in the
history says how often). Of the two, RLOO optimises the same KL-penalised reward as PPO with
an unbiased baseline; GRPO's division by the group's std weighs a prompt whose responses
barely differ as much as one whose responses differ a lot. Try one of them when PPO's value
loss will not settle, or as a baseline for PPO.

How this departs from PPO (``pipeline/ppo/trainer.py``):

- ``batch_size`` counts responses, not prompts, and must be a multiple of ``num_generations``
  (times the number of processes);
- one gradient step per sampled batch: ``ppo_epochs``, ``mini_batch_size`` and the other
  critic, GAE and validation settings are not its keys (setting one is an error naming it), and
  beta stays at ``kl_coef``;
- prompts are not cut to ``max_prompt_length`` (TRL 1.16 has no such setting);
- a response no reward source scored comes back to TRL as None: it is left out of its
  group's baseline and gets zero advantage, as PPO drops it;
- as in PPO, ``lr_scheduler_type`` and ``warmup_steps`` shape the learning rate (one optimizer
  step per step here, so TRL's per-optimizer-step schedule is the same), dropout is off and
  top-k sampling is off; TRL's loss settings (GRPO's ``dapo`` loss, group-std scaling) stay at
  TRL's defaults;
- ``model/`` holds the policy only (no ``value_head.pt``); with LoRA the adapters are merged
  and the reference is the policy with its adapters off.

Launch::

    python -m pipeline.ppo --config configs/grpo.yaml --num_generations 4
    rbrm ppo --config configs/grpo.yaml --algo rloo --output_dir runs/rloo
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from pipeline import runs
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.ppo.common import STAGE, finite_or_none, load_train_prompts, rbrm_classes
from pipeline.ppo.config import CriticFreeConfig
from pipeline.training import Timer, process_state

# TRL's log keys -> the names PPO's history uses, so runs of either kind read alike.
HISTORY_NAMES = {"reward": "reward/score", "reward_std": "reward/std", "kl": "objective/kl",
                 "step_time": "time/step_s"}

REWARD_FUNC_NAME = "composed_reward"


def check_config(cfg: CriticFreeConfig, num_processes: int) -> None:
    """Raise ConfigError for settings TRL's trainers cannot honour (one line, naming the keys)."""
    per_step = cfg.batch_size * num_processes
    if per_step % cfg.num_generations:
        across = f" x {num_processes} processes = {per_step}" if num_processes > 1 else ""
        raise ConfigError(
            f"keys 'batch_size' ({cfg.batch_size}{across}) and 'num_generations' ({cfg.num_generations}): {cfg.algo} "
            f"samples num_generations responses per prompt, so batch_size must be a multiple of num_generations")


def trl_args(cfg: CriticFreeConfig):
    """The GRPOConfig or RLOOConfig for ``cfg`` (checkpoints under ``<output_dir>/checkpoints``)."""
    import torch

    if cfg.algo == "grpo":
        from trl import GRPOConfig as ArgsClass
    else:
        from trl import RLOOConfig as ArgsClass

    out = Path(cfg.output_dir)
    # TensorBoard event files go to <run>/logs, as for the other stages (see pipeline.training).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "logs")
    cuda = torch.cuda.is_available()
    return ArgsClass(
        output_dir=str(out / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        num_iterations=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,  # TRL anneals per optimizer step, ours per PPO step
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=max(cfg.max_grad_norm, 0.0),  # 0: the Trainer does not clip
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        beta=cfg.kl_coef,
        epsilon=cfg.clip_range,
        disable_dropout=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        report_to=[r for r in cfg.report_to if r != "none"] or "none",
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def build_dataset(ds):
    """Our prompt rows -> TRL's conversational prompts plus the ``prompt_class`` column, which
    TRL hands to the reward function (repeated for each of a prompt's responses)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in ds["prompt"]],
                              "prompt_class": list(ds["prompt_class"])})


class _LastBatch:
    """The composer, keeping its last batch's per-source values for ``samples.jsonl``."""

    def __init__(self, composer):
        self.composer = composer
        self.info = None

    def __call__(self, prompts, responses, prompt_classes=None):
        total, self.info = self.composer(prompts, responses, prompt_classes)
        return total, self.info


def reward_function(composer, out: Path, sample_every: int, is_main: bool):
    """-> ``(reward_func, counts)``: the composer as TRL's reward function, also counting
    unscored responses in ``counts`` and appending every ``sample_every``-th step's samples
    to ``<out>/samples.jsonl`` (main process)."""
    from pipeline.rewards import as_trl_reward_func, completion_text, prompt_text

    recorder = _LastBatch(composer)
    inner = as_trl_reward_func(recorder, name=REWARD_FUNC_NAME)
    counts = {"responses": 0, "unscored": 0}

    def reward_func(prompts, completions, **kwargs) -> list[Optional[float]]:
        rewards = inner(prompts, completions, **kwargs)
        counts["responses"] += len(rewards)
        counts["unscored"] += sum(r is None for r in rewards)
        step = kwargs["trainer_state"].global_step + 1  # the step these responses are about to train
        if is_main and sample_every and step % sample_every == 0:
            classes = kwargs.get("prompt_class") or [None] * len(rewards)
            with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                for i, reward in enumerate(rewards):
                    f.write(json.dumps({
                        "step": step, "prompt": prompt_text(prompts[i]), "prompt_class": classes[i],
                        "response": completion_text(completions[i]), "reward": reward,
                        "rewards": {name: finite_or_none(raw[i]) for name, raw in recorder.info.raw.items()},
                    }) + "\n")
        return rewards

    reward_func.__name__ = reward_func.__qualname__ = REWARD_FUNC_NAME  # TRL logs rewards/<name>/mean
    return reward_func, counts


def history_callback(path: Path):
    """A TrainerCallback appending one line per logged step to ``path`` and keeping the rows."""
    from transformers import TrainerCallback

    class History(TrainerCallback):
        def __init__(self):
            self.rows: list[dict[str, Any]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:  # the end-of-training summary has no reward
                return
            row = {"step": state.global_step}
            for key, value in logs.items():
                if value is None or isinstance(value, (int, float)):
                    row[HISTORY_NAMES.get(key, key)] = None if value is None else finite_or_none(value)
            self.rows.append(row)
            if state.is_world_process_zero:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    return History()


def save_policy(trainer, tokenizer, output_dir: str, merge: bool) -> Path:
    """Write the policy (LoRA merged when ``merge``) to ``<output_dir>/model`` in one rename."""
    final = Path(output_dir) / runs.MODEL_DIR
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        staging = runs.staging_dir(output_dir)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        runs.publish_dir(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _mean_of(key: str, rows: list[dict]) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def main(cfg: CriticFreeConfig, reward_composer=None) -> dict:
    """Train with GRPO or RLOO and save the policy; returns the summary (also in ``metrics.json``).

    ``reward_composer`` replaces the one built from ``cfg.rewards`` (for tests and library use).
    """
    import torch

    from pipeline.models import load_causal_lm, load_tokenizer, resolve_model
    from pipeline.rewards import build_reward_composer

    state = process_state()
    is_main = state.is_main_process
    check_config(cfg, state.num_processes)
    timer = Timer()
    reused = runs.start(cfg.output_dir, STAGE, cfg, cfg.if_exists, is_main, state.wait_for_everyone)
    if reused is not None:
        return reused
    out = Path(cfg.output_dir)

    # Data and rewards first: a missing rubric or a bad row stops the run before any model loads.
    ds = load_train_prompts(cfg)
    prompts_per_step = cfg.batch_size * state.num_processes // cfg.num_generations
    if len(ds) < prompts_per_step:
        raise DataError(f"{cfg.prompts}: {len(ds)} training prompt(s), but each {cfg.algo} step takes "
                        f"{prompts_per_step} (batch_size x processes / num_generations); lower batch_size")
    classes = sorted(set(ds["prompt_class"]))
    composer = reward_composer or build_reward_composer(rbrm_classes(cfg.rewards, classes), clip=cfg.reward_clip)
    reward_func, counts = reward_function(composer, out, cfg.sample_every, is_main)
    if is_main:
        print(f"{cfg.algo}: {len(ds)} training prompts, {prompts_per_step} prompt(s) x {cfg.num_generations} "
              f"responses per step over {state.num_processes} process(es)", file=sys.stderr)

    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    args = trl_args(cfg)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    if cfg.algo == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    history = history_callback(out / "history.jsonl")
    trainer = Trainer(model=model, reward_funcs=[reward_func], args=args, train_dataset=build_dataset(ds),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[history])
    if state.num_processes > 1:
        from accelerate.utils import gather

        device = trainer.accelerator.device
        # Every process scores its own slice; normalise each source with all of them, as PPO does.
        composer.gather = lambda values: gather(torch.as_tensor(values, device=device)).cpu().numpy()

    result = trainer.train()
    final = save_policy(trainer, tokenizer, cfg.output_dir, merge=cfg.lora)

    totals = trainer.accelerator.reduce(
        torch.tensor([counts["responses"], counts["unscored"]], device=trainer.accelerator.device), reduction="sum")
    rows = history.rows
    k = max(1, min(5, len(rows) // 2))
    summary = {
        "algo": cfg.algo, "steps": result.global_step, "num_generations": cfg.num_generations,
        "responses": int(totals[0]), "skipped": int(totals[1]), "train_loss": finite_or_none(result.training_loss),
        "reward_first": _mean_of("reward/score", rows[:k]), "reward_last": _mean_of("reward/score", rows[-k:]),
        "kl_first": _mean_of("objective/kl", rows[:k]), "kl_last": _mean_of("objective/kl", rows[-k:]),
        "kl_coef": cfg.kl_coef, "summary_window_steps": k,
        "world_size": state.num_processes, "wall_time_s": timer.seconds,
    }
    if is_main:
        runs.finish(cfg.output_dir, STAGE, final, summary)
        print(f"{cfg.algo}: done in {summary['wall_time_s']}s; reward {summary['reward_first']} -> "
              f"{summary['reward_last']} (mean of the first/last {k} steps), {summary['skipped']} response(s) "
              f"unscored; model in {final}", file=sys.stderr)
    return summary

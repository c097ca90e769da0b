"""The PPO loop: set up, then per step sample, score, compute advantages, update, log,
validate and checkpoint; at the end publish the kept policy and the summary.

Every piece lives in its own module (see :mod:`pipeline.ppo`); this file only wires them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline import config as config_lib
from pipeline import runs
from pipeline.config import ConfigError
from pipeline.data import DataError, load_sft, read_rows
from pipeline.models import ModelError
from pipeline.ppo import checkpoint, logs, validation
from pipeline.ppo import math as ppo_math
from pipeline.ppo.common import STAGE, load_train_prompts, load_val_prompts, rbrm_classes
from pipeline.ppo.config import PolicyTrainingConfig, PPOConfig
from pipeline.ppo.policy import WeightAverage, build_optimizer, build_policy, save_policy
from pipeline.ppo.ptx import Demonstrations
from pipeline.ppo.rollout import PromptSchedule, rollout
from pipeline.ppo.state import TrainerState
from pipeline.ppo.step import advantages_from_scores, ppo_update
from pipeline.rbrm.rubric import RubricError
from pipeline.training import Timer, use_bf16


@dataclasses.dataclass
class Run:
    """What the loop works with, built by :func:`setup`."""

    cfg: PPOConfig
    out: Path
    accelerator: Any
    model: Any                          # the policy as accelerate prepared it (DDP-wrapped under several processes)
    policy: Any                         # the same policy unwrapped: PolicyWithValueHead
    ref_lm: Optional[torch.nn.Module]   # the frozen reference (None with LoRA: the policy with adapters off)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    ds: Any                             # the training prompts (validation prompts removed)
    state: TrainerState
    selector: validation.Selector
    validator: Optional[validation.Validator]
    amp: Callable[[], Any]              # the autocast context of forward passes (bf16 or none)
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]  # sum over processes; None for one
    rank_slice: slice                   # this process's rows of each step's prompts
    trackers: list[str]
    timer: Timer
    resume_path: Optional[Path] = None  # the checkpoint this run continues from
    demos: Optional[Demonstrations] = None  # PPO-ptx demonstrations (ptx_coef > 0)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def main(cfg: PolicyTrainingConfig, reward_composer=None) -> dict:
    """Run PPO and save the policy; returns the run's summary metrics (also in ``metrics.json``).

    ``reward_composer`` replaces the one built from ``cfg.rewards`` (for tests and library use).
    With ``algo: grpo`` or ``rloo`` the run is handed to :mod:`pipeline.ppo.critic_free` (TRL's trainers).
    """
    if cfg.algo != "ppo":
        from pipeline.ppo import critic_free

        return critic_free.main(cfg, reward_composer)
    from tqdm.auto import tqdm

    run = setup(cfg, reward_composer)
    if isinstance(run, dict):
        return run  # a finished run, reused
    acc, state = run.accelerator, run.state
    history = resume(run) if state.step else []
    if run.validator is not None and state.step == 0:
        validate(run, 0)   # the starting model: the baseline, and a candidate
    per_prompt = cfg.num_generations
    bar = tqdm(range(state.step + 1, cfg.max_steps + 1), desc="ppo", disable=not run.is_main, dynamic_ncols=True,
               initial=state.step, total=cfg.max_steps)
    for step in bar:
        start = time.perf_counter()
        # a prompt's responses sit next to each other: leave_one_out_centre relies on it
        rows = run.ds.select([i for i in state.schedule.next()[run.rank_slice] for _ in range(per_prompt)])
        with run.amp():
            ro = rollout(run.policy, run.ref_lm, run.tokenizer, rows["prompt"], rows["prompt_class"], cfg)
        rolled = time.perf_counter()
        total, info = state.composer(ro.prompts, ro.responses, ro.prompt_classes)  # NaN: no source applied
        if state.hold is not None:
            hold_refusals(state, cfg, ro, run.all_reduce)
        rec = advantages_from_scores(total, ro, cfg, state.kl_ctl.value, state.baseline, state.scale, run.all_reduce)
        scored_at = time.perf_counter()
        lr = ppo_math.scheduled_lr(cfg.learning_rate, step, cfg.max_steps, cfg.lr_scheduler_type, cfg.warmup_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if run.demos is not None:
            run.demos.reseed(step, acc.process_index)
        loss_stats = ppo_update(run.model, run.optimizer, acc, ro, rec.mask, rec.advantages, rec.returns, cfg,
                                state.shuffle, run.amp, run.demos)
        if state.average is not None:
            state.average.update()
        metrics = step_metrics(run, step, ro, rec, info, lr, loss_stats)
        metrics.update({"time/step_s": time.perf_counter() - start, "time/rollout_s": rolled - start,
                        "time/reward_s": scored_at - rolled, "time/update_s": time.perf_counter() - scored_at})
        history.append(metrics)
        state.step = step
        bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if run.is_main:
            logs.write_history(run.out, metrics)
            if run.trackers and step % cfg.logging_steps == 0:
                acc.log({k: v for k, v in metrics.items() if k != "step" and math.isfinite(v)}, step=step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                logs.write_samples(run.out, step, ro, total, info, rec.kl.sum(1))
        if run.validator is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
            validate(run, step)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
            checkpoint.save_checkpoint(acc, cfg, step, state.state_dict())
    bar.close()
    return finish(run, history)


def averaged(run: Run):
    """A block in which the policy's weights are the weight average (weight_average > 0)."""
    return run.state.average.applied() if run.state.average is not None else contextlib.nullcontext()


def validate(run: Run, step: int) -> None:
    """Validate (and, when kept, save) the policy that model/ would be: the weight average when on."""
    with averaged(run):
        run.validator(run.policy.lm, step)


def hold_refusals(state, cfg: PPOConfig, ro, all_reduce) -> None:
    """Update the refusal-hold multipliers from this step's rollouts (string match, over every
    process) and fold them into the class weights the scores are scaled by."""
    held = sorted(state.hold.targets)
    counts = validation.count_refused(ro.prompt_classes, ro.refused, held)       # (classes, 2)
    if all_reduce is not None:
        counts = all_reduce(counts.to(ro.logprobs.device)).cpu()
    state.hold.update(dict(zip(held, counts[:, 0].tolist())), dict(zip(held, counts[:, 1].tolist())))
    state.scale.weights = {c: cfg.class_weights.get(c, 1.0) * state.hold.weights.get(c, 1.0)
                           for c in set(cfg.class_weights) | set(held)}


def ptx_conversations(cfg: PPOConfig) -> list[list[dict]]:
    """The PPO-ptx demonstrations: every conversation of ``ptx_data``, or with ``ptx_classes``
    those whose row's ``prompt_class`` is listed."""
    conversations = load_sft(cfg.ptx_data)["messages"]
    if not cfg.ptx_classes:
        return list(conversations)
    kept, seen = [], set()
    for (where, row), messages in zip(read_rows(cfg.ptx_data), conversations):
        if "prompt_class" not in row:
            raise DataError(f"{where}: key 'ptx_classes' picks demonstrations by prompt_class, and this row has none")
        seen.add(row["prompt_class"])
        if row["prompt_class"] in cfg.ptx_classes:
            kept.append(messages)
    missing = sorted(set(cfg.ptx_classes) - seen)
    if missing:
        raise DataError(f"{cfg.ptx_data}: key 'ptx_classes' names {', '.join(map(repr, missing))}, but no "
                        f"demonstration has that prompt_class (they have: {', '.join(sorted(map(str, seen)))})")
    return kept


def setup(cfg: PPOConfig, reward_composer=None):
    """The accelerator, data, reward composer, models, optimizer and trainer state of a run, or
    the summary of a finished run that ``if_exists: reuse`` hands back. Checks that can fail on
    the user's input (checkpoints, data, rubrics) run before any model loads."""
    from accelerate import Accelerator
    from transformers import set_seed

    from pipeline.models import load_causal_lm, load_tokenizer, resolve_model
    from pipeline.rewards import build_reward_composer

    timer = Timer()
    trackers = [r for r in cfg.report_to if r != "none"]
    out = Path(cfg.output_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(out))
    # Our own autocast rather than Accelerator(mixed_precision=...): accelerate's state is one per
    # process, so a second run in the same process (the demo, tests) could not change it.
    bf16 = use_bf16(cfg.bf16)

    def amp():
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)

    is_main, world = accelerator.is_main_process, accelerator.num_processes
    resume_from = checkpoint.checkpoint_to_resume(cfg, world)
    reused = runs.start(cfg.output_dir, STAGE, cfg, cfg.if_exists, is_main, accelerator.wait_for_everyone)
    if reused is not None:
        return reused
    if resume_from is None and is_main:
        # a fresh start: files of an earlier attempt in this folder would mix with this run's
        for name in ("history.jsonl", "samples.jsonl", validation.FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / checkpoint.CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / checkpoint.BEST_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()

    ds = load_train_prompts(cfg)
    classes = sorted(set(ds["prompt_class"]))
    val_ds = None
    if cfg.val_prompts:
        val_ds = load_val_prompts(cfg, ds)
    elif cfg.val_fraction:
        ds, val_ds = validation.holdout(ds, cfg.val_fraction, cfg.seed)
    if val_ds is not None and cfg.select != "last":
        missing = [c for c in ("harmful", "safe") if c not in set(val_ds["prompt_class"])]
        if missing:
            raise DataError(f"{cfg.val_prompts or cfg.prompts}: select: {cfg.select} weighs harmful against "
                            f"safe validation prompts, but there are none of class {', '.join(missing)}; add "
                            "prompts of that class")
    unknown = sorted((set(cfg.class_mix) | set(cfg.class_weights) | set(cfg.hold_refusal)) - set(classes))
    if unknown:
        raise ConfigError(f"keys 'class_mix' / 'class_weights' / 'hold_refusal': no training prompt has class "
                          f"{unknown[0]!r}; "
                          f"the classes are {', '.join(classes)}")
    composer = reward_composer or build_reward_composer(rbrm_classes(cfg.rewards, classes), clip=cfg.reward_clip)
    # read now, so a data error shows before any model loads
    conversations = ptx_conversations(cfg) if cfg.ptx_coef > 0 else None
    if conversations is not None and not conversations:
        raise DataError(f"{cfg.ptx_data}: key 'ptx_data': no demonstrations in the file")

    set_seed(cfg.seed)
    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(path)
    demos = (Demonstrations(conversations, tokenizer, cfg.ptx_batch_size, cfg.max_prompt_length,
                            cfg.ptx_max_length, cfg.seed) if conversations is not None else None)
    policy, ref_lm = build_policy(load_causal_lm(path, tokenizer), cfg)
    optimizer = build_optimizer(policy, cfg.learning_rate, cfg.weight_decay)
    model, optimizer = accelerator.prepare(policy, optimizer)
    if ref_lm is not None:
        ref_lm.to(accelerator.device)
    if trackers:
        accelerator.init_trackers("logs", config={k: v for k, v in config_lib.to_dict(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
    per_prompt = cfg.num_generations
    kl_ctl = (ppo_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else ppo_math.FixedKLController(cfg.kl_coef))
    baseline = (ppo_math.ClassBaseline(classes, cfg.class_baseline_decay) if cfg.class_baseline and per_prompt == 1
                else None)
    scale = (ppo_math.ClassScale(classes, cfg.class_baseline_decay, cfg.class_weights, normalise=cfg.class_scale)
             if cfg.class_scale or cfg.class_weights or cfg.hold_refusal else None)
    hold = (ppo_math.RefusalHold(cfg.hold_refusal, cfg.hold_rate, cfg.hold_max_weight) if cfg.hold_refusal
            else None)
    # Sampling differs per process; the shuffle generator is per process too (different data).
    set_seed(cfg.seed + accelerator.process_index)
    shuffle = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    prompts_per_process = cfg.batch_size // per_prompt
    schedule = PromptSchedule(len(ds), prompts_per_process * world, cfg.seed, groups=ds["prompt_class"],
                              mix=cfg.class_mix or None)
    all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
    if world > 1 and hasattr(composer, "gather"):
        # reward normalisation statistics over every process's responses, not just this one's
        composer.gather = lambda a: accelerator.gather(
            torch.as_tensor(a, dtype=torch.float64, device=accelerator.device)).cpu().numpy()
    unwrapped = accelerator.unwrap_model(model)
    average = WeightAverage(unwrapped.lm, cfg.weight_average) if cfg.weight_average else None
    state = TrainerState(kl_ctl, schedule, shuffle, composer, baseline, scale, hold=hold, average=average)
    # A resumed run starts from the policy in best/, even one validated after the checkpoint it
    # resumes from (steps now being redone): it is a real, validated policy of this run.
    selector = validation.Selector(cfg.max_over_refusal, validation.load_best(out / checkpoint.BEST_DIR),
                                   rule="f1" if cfg.select == "f1" else "best", window=cfg.select_window)

    def publish_policy(dest: Path, record):
        """The current policy and its validation record to ``dest``, in one rename."""
        staging = runs.staging_dir(cfg.output_dir, dest.relative_to(out).as_posix().replace("/", "-"))
        save_policy(unwrapped, tokenizer, staging, merge=cfg.lora, keep_training=True)
        validation.write_record(staging, record)
        dest.parent.mkdir(exist_ok=True)
        runs.publish_dir(staging, dest)

    def save_best(record):
        publish_policy(out / checkpoint.BEST_DIR, record)

    def save_validated(record):
        publish_policy(out / validation.VALIDATED_DIR / f"step-{record['step']}", record)

    validator = None
    if val_ds is not None and cfg.val_every:
        validator = validation.Validator(val_ds, tokenizer, accelerator, cfg, out, selector, amp, save_best,
                                         log=accelerator.log if trackers else None,
                                         save_validated=save_validated if cfg.keep_validated else None)
    run = Run(cfg, out, accelerator, model, unwrapped, ref_lm, tokenizer, optimizer, ds, state, selector, validator,
              amp, all_reduce, slice(accelerator.process_index * prompts_per_process,
                                     (accelerator.process_index + 1) * prompts_per_process), trackers, timer,
              demos=demos)
    if is_main:
        per_step = cfg.batch_size * world
        drawn = (f"{per_step // per_prompt} prompts x {per_prompt} responses" if per_prompt > 1
                 else f"{per_step} responses")
        print(f"ppo: {len(ds)} training prompts, {drawn} per step over {world} process(es), "
              f"{cfg.batch_size // cfg.mini_batch_size * cfg.ppo_epochs} updates per step", file=sys.stderr)
    if resume_from is not None:
        path, _ = resume_from
        accelerator.load_state(str(path))
        state.load_state_dict(torch.load(path / f"trainer_state_{accelerator.process_index}.pt", weights_only=False))
        run.resume_path = path
    return run


def resume(run: Run) -> list[dict[str, float]]:
    """Trim the run folder's logs to the checkpoint's step and offer its validated steps again;
    -> the history so far."""
    kept = []
    if run.is_main:
        kept = checkpoint.trim_jsonl(run.out / "history.jsonl", run.state.step)
        checkpoint.trim_jsonl(run.out / "samples.jsonl", run.state.step)
        if run.validator is not None:
            run.validator.records = checkpoint.trim_jsonl(run.out / validation.FILE, run.state.step)
            checkpoint.trim_jsonl(run.out / validation.REPLIES_FILE, run.state.step)
            for record in run.validator.records:
                run.selector.offer(record)
        print(f"ppo: resuming from {run.resume_path} at step {run.state.step + 1}", file=sys.stderr)
    return [{k: (math.nan if v is None else v) for k, v in row.items()} for row in kept]


def step_metrics(run: Run, step: int, ro, rec, info, lr: float, loss_stats: dict[str, float]) -> dict[str, float]:
    """One step's logged metrics; batch sums are taken over processes, so every process updates
    the KL controller and the totals the same way."""
    acc, state = run.accelerator, run.state
    scored = rec.scored
    seq_kl = rec.kl.sum(1)                                                              # (B,)
    sums = torch.tensor([
        float(seq_kl[scored].sum()), float(scored.sum()), float(rec.raw_score[scored].sum()),
        float((~scored).sum()), float(ro.empty.sum()),
        float(ro.truncated.sum()), float(ro.response_mask.sum()), float(len(ro.responses)),
    ], device=acc.device)
    sums = acc.reduce(sums, reduction="sum").tolist()
    kl_sum, n_scored, score_sum, n_skipped, n_empty, n_trunc, n_tokens, n_resp = sums
    mean_kl = kl_sum / n_scored if n_scored else 0.0
    mean_score = score_sum / n_scored if n_scored else math.nan
    beta = state.kl_ctl.value
    state.kl_ctl.update(mean_kl, int(n_resp))
    for key, n in (("skipped", n_skipped), ("empty", n_empty), ("truncated", n_trunc), ("responses", n_resp)):
        state.totals[key] += int(n)
    return {"step": step, "reward/score": mean_score, "objective/kl": mean_kl, "objective/kl_coef": beta,
            "optim/lr": lr, "objective/rlhf_reward": mean_score - beta * mean_kl if n_scored else math.nan,
            "rollout/skipped": n_skipped, "rollout/empty": n_empty, "rollout/truncated": n_trunc,
            "rollout/response_length": n_tokens / max(n_resp, 1), **info.metrics(), **loss_stats,
            **({f"baseline/{c}": v for c, v in state.baseline.mean.items()} if state.baseline is not None else {}),
            **({f"scale/{c}_std": state.scale.std(c) for c in state.scale.var} if state.scale is not None else {}),
            **({f"hold/{c}_weight": w for c, w in state.hold.weights.items()} if state.hold is not None else {}),
            **({f"hold/{c}_refused": v for c, v in state.hold.share.items()} if state.hold is not None else {})}


def finish(run: Run, history: list[dict[str, float]]) -> dict:
    """Publish ``model/`` (the kept validated step, or the last policy), write the summary and the
    curves; -> the summary."""
    cfg, acc, out = run.cfg, run.accelerator, run.out
    acc.wait_for_everyone()
    final = out / runs.MODEL_DIR
    chosen = run.selector.best if cfg.select != "last" else None
    if run.is_main:
        if chosen is not None:
            runs.publish_dir(out / checkpoint.BEST_DIR, final)
        else:
            staging = runs.staging_dir(cfg.output_dir)
            with averaged(run):
                # merging unloads the adapters, which the average's restore writes back into
                save_policy(run.policy, run.tokenizer, staging, merge=cfg.lora,
                            keep_training=run.state.average is not None)
            runs.publish_dir(staging, final)
    acc.wait_for_everyone()
    if run.trackers:
        acc.end_training()

    def mean_of(key: str, part: list[dict]) -> Optional[float]:
        values = [h[key] for h in part if math.isfinite(h[key])]
        return sum(values) / len(values) if values else None

    k = max(1, min(5, len(history) // 2))
    totals = run.state.totals
    summary = {
        "steps": len(history), "responses": totals["responses"], "skipped": totals["skipped"],
        "empty": totals["empty"], "truncated": totals["truncated"],
        "reward_first": mean_of("reward/score", history[:k]), "reward_last": mean_of("reward/score", history[-k:]),
        "kl_first": mean_of("objective/kl", history[:k]), "kl_last": mean_of("objective/kl", history[-k:]),
        "kl_coef_final": run.state.kl_ctl.value, "summary_window_steps": k,
        "world_size": acc.num_processes, "wall_time_s": run.timer.seconds,
        "selected_step": chosen["step"] if chosen else cfg.max_steps,
    }
    val_records = run.validator.records if run.validator is not None else []
    if val_records:
        summary["validation_start"] = val_records[0] if val_records[0]["step"] == 0 else None
        summary["validation_last"] = val_records[-1]
        summary["validation_selected"] = chosen
    if run.is_main:
        logs.plot_history(history, out / "ppo_curves.png", val_records)
        runs.finish(cfg.output_dir, STAGE, final, summary)
        print(f"ppo: done in {summary['wall_time_s']}s; reward {summary['reward_first']} -> {summary['reward_last']} "
              f"(mean of the first/last {k} steps), {summary['skipped']} response(s) skipped; model in {final}",
              file=sys.stderr)
        if chosen is not None:
            within = cfg.select == "f1" or (chosen["over_refusal"] or 0) <= cfg.max_over_refusal
            print(f"ppo: {final} is the policy of {validation.describe(chosen)} (validation)"
                  + ("" if within else f"; no validated step refused at most {cfg.max_over_refusal:.0%} of safe "
                                       "prompts, so this is the one that refused fewest"), file=sys.stderr)
    return summary


def cli(argv: list[str] | None = None, description: str = "") -> None:
    """``rbrm ppo``: the settings class follows ``algo`` (from the command line, else the config file)."""
    import argparse

    from pipeline.ppo.config import config_class

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--algo")
    known, _ = pre.parse_known_args(argv)
    algo = known.algo
    if algo is None and known.config:
        try:
            algo = config_lib.load_yaml(known.config).get("algo")
        except ConfigError as e:
            config_lib.fail(str(e))
    cfg = config_lib.parse(config_class(str(algo or "ppo")), argv, prog="rbrm ppo", description=description or __doc__)
    try:
        main(cfg)
    except RubricError as e:
        config_lib.fail("; ".join(e.problems))
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))

"""Stage 4, PPO: optimise the SFT policy against the composed reward (RM + RBRM).

Each step samples one response per prompt from the current policy, scores the responses
with the reward composer (:mod:`pipeline.rewards`: the learned reward model, the rubric
grader, or any other source), turns the scores into per-token rewards with a KL penalty
towards the frozen starting model, and takes ``ppo_epochs`` passes of clipped PPO updates
over shuffled mini-batches (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019 and
Ouyang et al. 2022). The arithmetic lives in :mod:`pipeline.ppo_math`; this file only moves
tensors between models, the reward composer and those functions.

How it departs from the textbook, following Huang et al. ("The N+ implementation details
of RLHF with PPO"):

- the critic is a scalar linear head on the policy's last hidden state (shared trunk),
  zero-initialised, trained with the clipped value loss;
- log-probs are recomputed in one forward pass after generation, with the logits divided by
  the sampling temperature, so the ratio starts at exactly 1; top-k is off and ``top_p``
  defaults to 1 so that sampling matches those log-probs;
- dropout is off during rollout and training (the model stays in eval mode);
- the sequence score is added at the last real token (eos, or the last token of a truncated
  response) and the value after it is 0: a truncated response is not bootstrapped;
- a response no reward source could score (NaN total) is dropped from the update and counted,
  never imputed.

With ``lora: true`` the reference model is the policy with its adapters switched off, so
only one copy of the weights is held; otherwise it is a frozen deep copy.

Launch::

    python -m pipeline.ppo --config configs/ppo.yaml            # or: rbrm ppo --config ...
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m pipeline.ppo --config configs/ppo.yaml
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from torch import nn

from pipeline import config as config_lib
from pipeline import ppo_math, runs
from pipeline import ppo_validation as validation
from pipeline.config import ConfigError, field
from pipeline.data import DataError
from pipeline.models import ModelError, encode_user_turns
from pipeline.rbrm.rubric import RubricError
from pipeline.training import Timer, use_bf16

STAGE = "ppo"
CRITICS = ("value_head",)
ALGOS = ("ppo", "grpo", "rloo")

DEFAULT_REWARDS = {
    "rm": {"model": "runs/reward_model", "weight": 1.0, "normalise": "running"},
    "rbrm": {"weight": 1.0, "grader": {"backend": "embedding", "rubrics": ["rubrics"]}},
}


@dataclasses.dataclass
class PPOConfig:
    model: str = field("runs/sft", help="starting policy (and KL reference): run folder, model folder, short name or hub id")
    prompts: str = field("data/prompts.jsonl", help="prompt set; rows with split: eval are left out")
    fields: dict[str, str] = field({}, help="column renames, ours=theirs (e.g. prompt=question)")
    output_dir: str = field("runs/ppo", help="run folder: config, logs, samples, metrics and the final model/")
    if_exists: str = field("error", help="when output_dir holds a finished run: error | reuse | overwrite")
    algo: str = field("ppo", help="ppo (ours, with a critic) | grpo | rloo (TRL's critic-free trainers on the same rewards)")
    num_generations: int = field(4, help="grpo/rloo: responses sampled per prompt (the group a baseline is taken over)")
    steps: int = field(20, help="PPO steps; each samples batch_size responses per process, then updates")
    batch_size: int = field(4, help="responses per step, per process (batch_size / responses_per_prompt prompts)")
    responses_per_prompt: int = field(1, help="ppo: responses sampled for each prompt of a step; > 1 centres each "
                                              "score on the mean of the other responses to its prompt (RLOO's "
                                              "baseline, ppo_math.leave_one_out_centre) in place of class_baseline")
    mini_batch_size: int = field(2, help="responses per gradient step; must divide batch_size")
    ppo_epochs: int = field(2, help="passes over each step's responses")
    learning_rate: float = field(1e-6, help="AdamW learning rate (LoRA usually wants ~10x more)")
    lr_schedule: str = field("constant", help="constant | linear (anneal the learning rate from learning_rate at step 1 "
                                              "towards 0 at the last step; a resume that raises steps stretches it)")
    lr_warmup_steps: int = field(0, help="raise the learning rate linearly over the first this many PPO steps "
                                         "(Adam's first updates are the largest; see ppo_math.scheduled_lr)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this; <= 0 = no clipping")
    max_prompt_length: int = field(256, help="longer prompts keep their last tokens")
    max_new_tokens: int = field(48, help="response length limit; a response without eos by then is 'truncated'")
    temperature: float = field(1.0, help="sampling temperature (log-probs use the same one)")
    top_p: float = field(1.0, help="nucleus sampling; < 1 makes sampling differ from the log-probs PPO uses")
    kl_coef: float = field(0.05, help="KL penalty coefficient beta (initial value when adaptive_kl)")
    adaptive_kl: bool = field(False, help="adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = field(6.0, help="adaptive_kl: target KL per response, in nats")
    kl_horizon: int = field(10000, help="adaptive_kl: horizon in responses")
    kl_estimator: str = field("k1", help="per-token KL estimator in the reward: k1 | k2 | k3")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE lambda")
    clip_range: float = field(0.2, help="policy ratio clip epsilon")
    clip_range_value: float = field(0.2, help="how far a value may move from its rollout value before clipping")
    vf_coef: float = field(0.1, help="weight of the value loss in the total loss")
    class_baseline: bool = field(True, help="subtract from each score a moving average of its prompt class's scores "
                                            "(a baseline per class; see ppo_math.ClassBaseline); used when "
                                            "responses_per_prompt is 1")
    class_baseline_decay: float = field(0.9, help="class_baseline: weight of the old average at each step")
    class_mix: dict[str, float] = field({}, help="share of each step's prompts per class, e.g. harmful=0.4,safe=0.4,"
                                                 "sensitive=0.2 (normalised; a class left out is not drawn); "
                                                 "empty = the data's own mix")
    class_scale: bool = field(False, help="divide each class's centred scores by a moving average of that class's "
                                          "spread (decay class_baseline_decay), so every class carries the same "
                                          "weight of the update whatever its rubric's reward range "
                                          "(ppo_math.ClassScale)")
    class_weights: dict[str, float] = field({}, help="multiply each class's centred scores, e.g. harmful=1.5 "
                                                     "(after class_scale when on); a class left out weighs 1")
    whiten_advantages: bool = field(True, help="whiten advantages over each step's real tokens")
    reward_clip: Optional[float] = field(None, help="clip the composed reward to [-c, c]; null = no clipping")
    bf16: Optional[bool] = field(None, help="bf16 autocast in rollouts and updates (weights and optimizer stay fp32); "
                                            "null = on where the hardware does bf16 fast (AMX CPU, bf16 GPU)")
    lora: bool = field(False, help="train LoRA adapters; the reference is then the policy with adapters off")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA scaling numerator (scale = alpha / r)")
    critic: str = field("value_head", help="value function: value_head (a linear head on the policy's last hidden state)")
    rewards: Any = field(DEFAULT_REWARDS, help="reward sources, {name: settings} as in pipeline.rewards.build_reward_composer")
    seed: int = field(42, help="seed for prompt order, sampling and initialisation")
    log_every: int = field(1, help="send metrics to the trackers every N steps")
    sample_every: int = field(5, help="append the step's rollouts to samples.jsonl every N steps; 0 = never")
    save_every: int = field(0, help="every N steps save a resumable checkpoint to checkpoints/step-N (policy, value head, "
                                    "optimizer, RNG, KL coefficient, reward statistics, prompt order); 0 = never")
    keep_checkpoints: int = field(2, help="how many of the newest checkpoints to keep; older ones are deleted")
    resume: Any = field(False, help="true: continue from the newest checkpoint in output_dir (error if there is none); "
                                    "auto: continue if there is one, else start; false: start from step 0")
    val_fraction: float = field(0.0, help="share of each prompt class's training prompts held out for validation "
                                          "(seeded by seed); 0 = train on all")
    val_every: int = field(0, help="every N steps (and at step 0 and the last step) decode the held-out prompts greedily "
                                   "and log refusal rates by string match to validation.jsonl; 0 = never")
    val_max_new_tokens: int = field(16, help="validation reply length; a refusal shows in its opening words")
    val_batch_size: int = field(64, help="validation prompts decoded together")
    select: str = field("last", help="which policy becomes model/: last | f1 (the validated step with the best "
                                     "harmonic mean of harmful prompts refused and safe prompts answered) | best "
                                     "(the validated step that refuses the most harmful prompts while refusing at "
                                     "most max_over_refusal of safe ones)")
    max_over_refusal: float = field(0.05, help="select: best: the over-refusal budget, a share of safe validation prompts")
    report_to: list[str] = field(["tensorboard"], help="trackers (tensorboard, wandb, none); logs go to <run>/logs")
    cache_dir: Optional[str] = field(None, help="model cache for short names (default $RBRM_CACHE_DIR or ./.cache/models)")

    def validate(self) -> None:
        if self.if_exists not in runs.IF_EXISTS:
            raise ConfigError(f"key 'if_exists': expected one of {', '.join(runs.IF_EXISTS)}, got {self.if_exists!r}")
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "max_prompt_length",
                     "log_every", "kl_horizon", "val_max_new_tokens", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': expected a positive integer, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"key 'keep_checkpoints': expected a positive integer, got {self.keep_checkpoints}")
        if self.save_every < 0:
            raise ConfigError(f"key 'save_every': expected 0 (never) or a positive integer, got {self.save_every}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"key 'lr_warmup_steps': expected 0 (none) or a positive integer, got {self.lr_warmup_steps}")
        if not 0 <= self.class_baseline_decay < 1:
            raise ConfigError(f"key 'class_baseline_decay': expected a number in [0, 1), got {self.class_baseline_decay}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"key 'val_fraction': expected a share in [0, 1), got {self.val_fraction}")
        if self.val_every < 0:
            raise ConfigError(f"key 'val_every': expected 0 (never) or a positive integer, got {self.val_every}")
        if self.val_every and not self.val_fraction:
            raise ConfigError("key 'val_every': validation needs held-out prompts; set val_fraction (e.g. 0.2)")
        if self.select not in validation.SELECT:
            raise ConfigError(f"key 'select': expected one of {', '.join(validation.SELECT)}, got {self.select!r}")
        if self.select != "last" and not self.val_every:
            raise ConfigError(f"key 'select': {self.select} chooses among validated steps; set val_every and "
                              "val_fraction")
        for name in ("class_mix", "class_weights"):
            bad = {k: v for k, v in getattr(self, name).items() if not (v >= 0 and math.isfinite(v))}
            if bad:
                raise ConfigError(f"key '{name}': expected shares/weights >= 0, got {bad}")
        if self.class_mix and not sum(self.class_mix.values()) > 0:
            raise ConfigError(f"key 'class_mix': at least one class needs a share above 0, got {self.class_mix}")
        if not 0 <= self.max_over_refusal <= 1:
            raise ConfigError(f"key 'max_over_refusal': expected a share in [0, 1], got {self.max_over_refusal}")
        resume = str(self.resume).strip().lower()
        if resume not in ("true", "false", "auto"):
            raise ConfigError(f"key 'resume': expected true, false or auto, got {self.resume!r}")
        self.resume = {"true": True, "false": False}.get(resume, "auto")
        if self.responses_per_prompt < 1:
            raise ConfigError(f"key 'responses_per_prompt': expected a positive integer, "
                              f"got {self.responses_per_prompt}")
        if self.batch_size % self.responses_per_prompt:
            raise ConfigError(f"keys 'batch_size' ({self.batch_size}) and 'responses_per_prompt' "
                              f"({self.responses_per_prompt}): batch_size counts responses, so it must be a multiple "
                              "of responses_per_prompt")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"keys 'batch_size' ({self.batch_size}) and 'mini_batch_size' ({self.mini_batch_size}): "
                              "mini_batch_size must divide batch_size")
        for name in ("learning_rate", "temperature", "clip_range", "clip_range_value", "kl_target"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"key '{name}': expected a positive number, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"key 'top_p': expected a number in (0, 1], got {self.top_p}")
        if self.kl_coef < 0:
            raise ConfigError(f"key 'kl_coef': expected a number >= 0, got {self.kl_coef}")
        if self.lr_schedule not in ppo_math.LR_SCHEDULES:
            raise ConfigError(f"key 'lr_schedule': expected one of {', '.join(ppo_math.LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.kl_estimator not in ppo_math.KL_ESTIMATORS:
            raise ConfigError(f"key 'kl_estimator': expected one of {', '.join(ppo_math.KL_ESTIMATORS)}, "
                              f"got {self.kl_estimator!r}")
        if self.algo not in ALGOS:
            raise ConfigError(f"key 'algo': expected one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.algo != "ppo" and self.num_generations < 2:
            raise ConfigError(f"key 'num_generations': {self.algo} needs at least 2 responses per prompt, "
                              f"got {self.num_generations}")
        if self.critic not in CRITICS:
            raise ConfigError(f"key 'critic': expected one of {', '.join(CRITICS)}, got {self.critic!r}")
        if isinstance(self.rewards, str):  # from the command line: a YAML flow mapping or a JSON object
            try:
                self.rewards = yaml.safe_load(self.rewards)
            except yaml.YAMLError:
                raise ConfigError(f"key 'rewards': expected a mapping of reward sources, got {self.rewards!r}") from None
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ConfigError(f"key 'rewards': expected a non-empty mapping of reward sources, got {self.rewards!r}")


# --------------------------------------------------------------------------- models


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state.

    ``forward`` returns ``(logits, values)``: ``(B, L, V)`` next-token logits and ``(B, L)``
    ``V(s)`` for the state ending at each position. The head starts at zero so the first
    advantages are the raw returns, not noise from a random critic.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]                                  # (B, L, H)
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()  # (B, L); fp32 under autocast too
        return out.logits, values


def build_policy(lm: nn.Module, cfg: PPOConfig) -> tuple[PolicyWithValueHead, Optional[nn.Module]]:
    """-> ``(policy, ref_lm)``. With LoRA ``ref_lm`` is None: the reference is ``policy.lm``
    under ``disable_adapter()``; otherwise it is a frozen copy of ``lm``."""
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        ref_lm = None
    else:
        ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    policy = PolicyWithValueHead(lm).eval()  # eval: no dropout anywhere in PPO
    return policy, ref_lm


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids that skip left padding, as ``generate`` numbers them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_forward(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     lm_only: bool = False):
    """Log-probs (and values) of the response tokens given the prompt.

    Args:
        model: a :class:`PolicyWithValueHead` (``lm_only=False``) or a bare causal LM.
        query_ids: ``(B, P)`` left-padded prompt ids; ``query_mask`` ``(B, P)`` 1 for prompt tokens.
        response_ids: ``(B, T)`` right-padded response ids; ``response_mask`` ``(B, T)`` 1 for
            real response tokens (up to and including eos).
        temperature: the sampling temperature; logits are divided by it.

    Returns ``(logprobs, values)``: ``(B, T)`` ``log pi(a_t | s_t)`` and ``(B, T)`` ``V(s_t)``
    (``values`` is None with ``lm_only``). Position ``P - 1 + t`` is the state before token t.
    """
    input_ids = torch.cat([query_ids, response_ids], 1)                  # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], 1).long()    # (B, P + T)
    position_ids = _positions(attention_mask)
    p = query_ids.shape[1]
    if lm_only:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        values = None
    else:
        logits, values = model(input_ids, attention_mask, position_ids)
        values = values[:, p - 1:-1]                                     # (B, T)
    logits = logits[:, p - 1:-1].float() / temperature                  # (B, T, V) predicts response tokens
    return ppo_math.logprobs_from_logits(logits, response_ids), values


# --------------------------------------------------------------------------- rollout


@dataclasses.dataclass
class Rollout:
    """One step's sampled responses and everything PPO needs about them."""

    query_ids: torch.Tensor      # (B, P) prompt token ids, left-padded
    query_mask: torch.Tensor     # (B, P) 1 for prompt tokens, 0 for left padding
    response_ids: torch.Tensor   # (B, T) sampled token ids, right-padded with the pad id
    response_mask: torch.Tensor  # (B, T) 1 for real response tokens, up to and including eos
    logprobs: torch.Tensor       # (B, T) log pi_old(a_t | s_t) under the rollout policy (at temperature)
    ref_logprobs: torch.Tensor   # (B, T) log pi_ref(a_t | s_t) of the same tokens
    values: torch.Tensor         # (B, T) V(s_t) from the value head at rollout time
    truncated: torch.Tensor      # (B,) bool: no eos within max_new_tokens
    prompts: list[str]           # B prompt texts
    prompt_classes: list[str]    # B prompt classes
    responses: list[str]         # B decoded responses (special tokens removed)

    @property
    def empty(self) -> torch.Tensor:
        """(B,) bool: the response has no real token at all (all-zero mask)."""
        return self.response_mask.sum(1) == 0


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` sampled ids -> ``(mask, truncated)``.

    ``mask`` ``(B, T)`` is 1 up to and including the first eos of a row and 0 after it;
    a row without eos (``truncated``, ``(B,)`` bool) is 1 everywhere.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))  # (B, T)
    # eos strictly before position t: every token after the first eos is padding.
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~eos_before).long(), ~is_eos.any(1)


@torch.no_grad()
def rollout(policy: PolicyWithValueHead, ref_lm: Optional[nn.Module], tokenizer, prompts: list[str],
            prompt_classes: list[str], cfg: PPOConfig) -> Rollout:
    """Sample one response per entry of ``prompts`` and record log-probs, reference log-probs and values.

    ``policy`` is the unwrapped policy; ``ref_lm`` the frozen reference, or None to use the
    policy's LM with its LoRA adapters disabled. Prompts are rendered with the chat template
    (generation prompt added) and left-padded so every row's response starts at column P.
    """
    device = next(policy.parameters()).device
    enc = encode_user_turns(tokenizer, prompts, cfg.max_prompt_length, device)
    query_ids, query_mask = enc["input_ids"], enc["attention_mask"]     # (B, P)
    eos_ids = [tokenizer.eos_token_id]
    out = policy.lm.generate(
        input_ids=query_ids, attention_mask=query_mask, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id)
    response_ids = out[:, query_ids.shape[1]:]                          # (B, T), T <= max_new_tokens
    response_mask, truncated = response_mask_from_ids(response_ids, eos_ids)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    logprobs, values = response_forward(policy, query_ids, query_mask, response_ids, response_mask, cfg.temperature)
    if ref_lm is None:
        with policy.lm.disable_adapter():
            ref_logprobs, _ = response_forward(policy.lm, query_ids, query_mask, response_ids, response_mask,
                                               cfg.temperature, lm_only=True)
    else:
        ref_logprobs, _ = response_forward(ref_lm, query_ids, query_mask, response_ids, response_mask,
                                           cfg.temperature, lm_only=True)
    responses = tokenizer.batch_decode(torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    return Rollout(query_ids, query_mask, response_ids, response_mask, logprobs, ref_logprobs, values,
                   truncated, list(prompts), list(prompt_classes), responses)


# --------------------------------------------------------------------------- one PPO step


def ppo_update(model, optimizer, accelerator, ro: Rollout, mask: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, cfg: PPOConfig, generator: torch.Generator,
               amp: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped PPO over shuffled mini-batches of one rollout.

    ``amp`` makes the context the forward passes run in (bf16 autocast, or none).

    ``mask`` ``(B, T)`` is the response mask with unscored rows zeroed; ``advantages`` and
    ``returns`` are ``(B, T)``. Returns the mean of each loss statistic over the updates.

    Under several processes each loss is this process's token sum divided by the global
    mini-batch's token count over the world size, so the gradient all-reduce yields the mean
    over every real token: the same update as one process holding the whole global batch.
    """
    stats: dict[str, list[float]] = {}
    n = mask.shape[0]
    world = accelerator.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(mask.device)
        for start in range(0, n, cfg.mini_batch_size):
            idx = order[start:start + cfg.mini_batch_size]
            mb_mask = mask[idx]                                          # (b, T)
            tokens = mb_mask.sum().float()
            if world > 1:
                tokens = accelerator.reduce(tokens, reduction="sum")
            if float(tokens) == 0:
                continue  # no scored token on any process: nothing to learn (the same choice everywhere)
            token_count = tokens / world
            with amp():
                new_logprobs, new_values = response_forward(model, ro.query_ids[idx], ro.query_mask[idx],
                                                            ro.response_ids[idx], ro.response_mask[idx], cfg.temperature)
            pg_loss, pg_stats = ppo_math.policy_loss(new_logprobs, ro.logprobs[idx], advantages[idx], mb_mask,
                                                     cfg.clip_range, token_count)
            vf_loss, vf_stats = ppo_math.value_loss(new_values, ro.values[idx], returns[idx], mb_mask,
                                                    cfg.clip_range_value, token_count)
            loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in {"loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
                               "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"],
                               "value/clipfrac": vf_stats["vf_clipfrac"]}.items():
                stats.setdefault(key, []).append(float(value.detach()))
    means = {k: sum(v) / len(v) for k, v in stats.items()}
    if world > 1 and means:
        # a process's loss is its token sum over (global tokens / world): their mean is the global loss
        keys = sorted(means)
        avg = accelerator.reduce(torch.tensor([means[k] for k in keys], device=mask.device), reduction="mean")
        means = dict(zip(keys, avg.tolist()))
    return means


# --------------------------------------------------------------------------- helpers


def _finite_or_none(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


class PromptSchedule:
    """Endless batches of ``per_step`` row indices, reshuffled each epoch; resumable.

    With ``groups`` (a label per row, the prompt class) each epoch is stratified: every class's
    rows are shuffled and spread evenly through the epoch, so each batch holds the classes in
    about their proportion in the data. With 8 responses a step, plain shuffling of the demo's
    training prompts drew batches of 6 harmful and 1 safe prompt, and of 1 harmful and 7 safe
    (stratified: 2-4 of each); steps like that move the policy's overall readiness to refuse
    up or down with the draw instead of with the reward.

    With ``mix`` (class -> share of each batch; needs ``groups``) the batch holds the classes in
    that mix, whatever their proportion in the data: each class is drawn from its own stream of
    shuffled epochs, and each step's quota per class is the largest-remainder rounding of
    ``share * per_step`` plus what earlier steps' rounding owed it, so the mix holds exactly over
    the steps. A class with share 0 is never drawn. Without it, a data set with more safe than
    harmful prompts lets a shift of the refusal threshold towards answering earn more on the
    safe prompts than it costs on the harmful ones.

    Every process holds the same schedule (same seed) and takes its slice of each batch.
    """

    def __init__(self, n_rows: int, per_step: int, seed: int, groups: Optional[Sequence[Any]] = None,
                 mix: Optional[dict[str, float]] = None):
        if groups is not None and len(groups) != n_rows:
            raise ValueError(f"groups has {len(groups)} labels for {n_rows} rows")
        self.n_rows, self.per_step = n_rows, per_step
        self.members: Optional[dict[Any, list[int]]] = None     # class -> its rows, in row order
        if groups is not None:
            self.members = {}
            for i, g in enumerate(groups):
                self.members.setdefault(g, []).append(i)
        self.mix: Optional[dict[str, float]] = None
        if mix:
            if self.members is None:
                raise ValueError("a class mix needs the rows' classes (groups)")
            absent = [c for c, share in mix.items() if share > 0 and c not in self.members]
            if absent:
                raise ValueError(f"class mix names {', '.join(absent)}, which no row has")
            total = sum(mix.values())
            self.mix = {c: share / total for c, share in sorted(mix.items()) if share > 0}
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.streams: dict[str, list[int]] = {c: [] for c in (self.mix or {})}  # class -> its rows still to draw
        self.owed: dict[str, float] = {c: 0.0 for c in (self.mix or {})}         # rounding carried between steps

    def _epoch(self) -> list[int]:
        if self.members is None:
            epoch = list(range(self.n_rows))
            self.rng.shuffle(epoch)
            return epoch
        keyed = []
        for g in sorted(self.members, key=str):
            rows = list(self.members[g])
            self.rng.shuffle(rows)
            # the k-th of n rows of a class lands at a random point of the k-th n-th of the epoch
            keyed += [((k + self.rng.random()) / len(rows), i) for k, i in enumerate(rows)]
        return [i for _, i in sorted(keyed)]

    def quotas(self) -> dict[str, int]:
        """This step's rows per class under ``mix`` (largest remainder, carrying what is owed)."""
        want = {c: self.owed[c] + share * self.per_step for c, share in self.mix.items()}
        take = {c: math.floor(w) for c, w in want.items()}
        spare = self.per_step - sum(take.values())
        for c in sorted(want, key=lambda c: (-(want[c] - take[c]), c))[:spare]:
            take[c] += 1
        self.owed = {c: want[c] - take[c] for c in want}
        return take

    def next(self) -> list[int]:
        if self.mix is not None:
            batch = []
            for c, k in self.quotas().items():
                while len(self.streams[c]) < k:
                    rows = list(self.members[c])
                    self.rng.shuffle(rows)
                    self.streams[c] += rows
                batch += self.streams[c][:k]
                self.streams[c] = self.streams[c][k:]
            self.rng.shuffle(batch)  # so each process's slice holds a mix too
            return batch
        while len(self.order) < self.per_step:
            self.order += self._epoch()
        batch, self.order = self.order[:self.per_step], self.order[self.per_step:]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order),
                "streams": {c: list(v) for c, v in self.streams.items()}, "owed": dict(self.owed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])
        self.streams = {c: list(v) for c, v in state.get("streams", self.streams).items()}
        self.owed = dict(state.get("owed", self.owed))


def _rbrm_classes(rewards: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Give rbrm entries that do not list ``classes`` the prompt classes present in the data,
    so a missing rubric is reported for exactly the classes the run will meet."""
    out = {}
    for name, entry in rewards.items():
        entry = dict(entry) if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and (entry.get("type") or name) == "rbrm" and "classes" not in entry:
            entry["classes"] = classes
        out[name] = entry
    return out


def load_train_prompts(cfg: PPOConfig):
    from pipeline.data import load_prompts

    ds = load_prompts(cfg.prompts, cfg.fields)
    ds = ds.select([i for i, split in enumerate(ds["split"]) if split != "eval"])
    if len(ds) == 0:
        raise DataError(f"{cfg.prompts}: no training prompts (every row has split: eval)")
    return ds


CHECKPOINTS = "checkpoints"
BEST_DIR = "best"                   # select: best keeps the best validated policy here until the end
VALIDATION_FILE = "validation.jsonl"
STATE_FILE = "trainer_state.json"
# Settings a resumed run may change: how long it runs and how it logs, not what it learns.
RESUME_FREE_KEYS = frozenset({"steps", "if_exists", "resume", "log_every", "sample_every", "save_every",
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
    if cfg.resume is False:
        if found and cfg.if_exists != "overwrite":
            raise ConfigError(f"output_dir '{out}' holds an unfinished ppo run with checkpoints up to step "
                              f"{found[-1][0]}; nothing was changed. Pass --resume true to continue it, or "
                              "--if_exists overwrite to start again from step 0.")
        return None
    if cfg.resume is True and cfg.if_exists == "overwrite":
        raise ConfigError("keys 'resume' and 'if_exists': resume: true continues a run and if_exists: overwrite "
                          "starts it again; choose one")
    if not found:
        if cfg.resume is True:
            raise ConfigError(f"resume: no checkpoint in '{out / CHECKPOINTS}' (they are written every save_every "
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
    if step >= cfg.steps:
        raise ConfigError(f"cannot resume from '{path}': it is at step {step} and steps is {cfg.steps}; "
                          "raise steps to train further")
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


def _trim_jsonl(path: Path, last_step: int) -> list[dict]:
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


def save_policy(policy: PolicyWithValueHead, tokenizer, path: Path, merge: bool, keep_training: bool = False) -> None:
    """Write the policy's LM (LoRA merged when ``merge``) and tokenizer to ``path``, plus the
    value head as ``value_head.pt`` beside them. ``keep_training``: merge a copy, because
    merging unloads the adapters of the model it is called on."""
    lm = policy.lm
    if merge and hasattr(lm, "merge_and_unload"):
        lm = (copy.deepcopy(lm) if keep_training else lm).merge_and_unload()
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(policy.v_head.state_dict(), Path(path) / "value_head.pt")


def plot_history(history: list[dict[str, float]], path: Path,
                 val_records: Sequence[dict[str, Any]] = ()) -> Optional[Path]:
    """``ppo_curves.png``: reward (total and per source), KL, the rubric grader's category
    rates per prompt class, and the validation refusal rates (the selected step marked),
    against the step. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for h in history for k in h})
    sources = [k for k in keys if k.startswith("reward/") and not k.endswith(("_nan", "_inf"))
               and k not in ("reward/score", "reward/unscored")]
    rates = [k for k in keys if k.count("/") == 2 and k.endswith("_rate")]
    panels = [("reward", ["reward/score", *sources]), ("KL to the reference (nats per response)", ["objective/kl"])]
    if rates:
        panels.append(("rubric grader: share of responses per category", rates))
    if val_records:
        panels.append(("validation: share refused (greedy, string match)", [*validation.RATES, "f1"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        rows = val_records if title.startswith("validation") else history
        for key in series:
            ys = [h.get(key, math.nan) for h in rows]
            ax.plot([h["step"] for h in rows], [math.nan if y is None else y for y in ys], marker=".", label=key)
        chosen = [r["step"] for r in rows if r.get("selected")]
        if rows is val_records and chosen:
            ax.axvline(chosen[-1], color="grey", linestyle="--", label=f"best (step {chosen[-1]})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def main(cfg: PPOConfig, reward_composer=None) -> dict:
    """Run PPO and save the policy; returns the run's summary metrics (also in ``metrics.json``).

    ``reward_composer`` replaces the one built from ``cfg.rewards`` (for tests and library use).
    With ``algo: grpo`` or ``rloo`` the run is handed to :mod:`pipeline.critic_free` (TRL's trainers).
    """
    if cfg.algo != "ppo":
        from pipeline import critic_free

        return critic_free.main(cfg, reward_composer)
    from accelerate import Accelerator
    from tqdm.auto import tqdm
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

    is_main = accelerator.is_main_process
    resume_from = checkpoint_to_resume(cfg, accelerator.num_processes)
    reused = runs.start(cfg.output_dir, STAGE, cfg, cfg.if_exists, is_main, accelerator.wait_for_everyone)
    if reused is not None:
        return reused
    if resume_from is None and is_main:
        # a fresh start: files of an earlier attempt in this folder would mix with this run's
        for name in ("history.jsonl", "samples.jsonl", VALIDATION_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()

    # Data and rewards first: a missing rubric or a bad row stops the run before any model loads.
    ds = load_train_prompts(cfg)
    classes = sorted(set(ds["prompt_class"]))
    val_ds = None
    if cfg.val_fraction:
        ds, val_ds = validation.holdout(ds, cfg.val_fraction, cfg.seed)
        if cfg.select != "last":
            missing = [c for c in ("harmful", "safe") if c not in set(val_ds["prompt_class"])]
            if missing:
                raise DataError(f"{cfg.prompts}: select: {cfg.select} weighs harmful against safe validation prompts, but "
                                f"there are none of class {', '.join(missing)}; add training prompts of that class")
    composer = reward_composer or build_reward_composer(_rbrm_classes(cfg.rewards, classes), clip=cfg.reward_clip)

    set_seed(cfg.seed)
    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(path)
    policy, ref_lm = build_policy(load_causal_lm(path, tokenizer), cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(policy, optimizer)
    if ref_lm is not None:
        ref_lm.to(accelerator.device)
    if trackers:
        accelerator.init_trackers("logs", config={k: v for k, v in config_lib.to_dict(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
    per_prompt = cfg.responses_per_prompt
    baseline = (ppo_math.ClassBaseline(classes, cfg.class_baseline_decay) if cfg.class_baseline and per_prompt == 1
                else None)
    unknown = sorted(set(cfg.class_mix) - set(classes)) + sorted(set(cfg.class_weights) - set(classes))
    if unknown:
        raise ConfigError(f"keys 'class_mix' / 'class_weights': no training prompt has class {unknown[0]!r}; "
                          f"the classes are {', '.join(classes)}")
    scale = (ppo_math.ClassScale(classes, cfg.class_baseline_decay, cfg.class_weights, normalise=cfg.class_scale)
             if cfg.class_scale or cfg.class_weights else None)
    kl_ctl = (ppo_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else ppo_math.FixedKLController(cfg.kl_coef))
    # Sampling differs per process; the shuffle generator is per process too (different data).
    set_seed(cfg.seed + accelerator.process_index)
    shuffle = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    prompts_per_process = cfg.batch_size // per_prompt
    schedule = PromptSchedule(len(ds), prompts_per_process * accelerator.num_processes, cfg.seed,
                              groups=ds["prompt_class"], mix=cfg.class_mix or None)
    world = accelerator.num_processes
    if world > 1 and hasattr(composer, "gather"):
        # reward normalisation statistics over every process's responses, not just this one's
        composer.gather = lambda a: accelerator.gather(
            torch.as_tensor(a, dtype=torch.float64, device=accelerator.device)).cpu().numpy()
    rank_slice = slice(accelerator.process_index * prompts_per_process,
                       (accelerator.process_index + 1) * prompts_per_process)
    if is_main:
        per_step = cfg.batch_size * accelerator.num_processes
        drawn = (f"{per_step // per_prompt} prompts x {per_prompt} responses" if per_prompt > 1
                 else f"{per_step} responses")
        print(f"ppo: {len(ds)} training prompts, {drawn} per step over {accelerator.num_processes} "
              f"process(es), {cfg.batch_size // cfg.mini_batch_size * cfg.ppo_epochs} updates per step",
              file=sys.stderr)

    history: list[dict[str, float]] = []
    totals = {"skipped": 0, "empty": 0, "truncated": 0, "responses": 0}
    first_step = 1
    # A resumed run starts from the policy in best/, even one validated after the checkpoint it
    # resumes from (steps now being redone): it is a real, validated policy of this run.
    selector = validation.Selector(cfg.max_over_refusal, validation.load_best(out / BEST_DIR),
                                   rule="f1" if cfg.select == "f1" else "best")
    val_records: list[dict[str, Any]] = []
    if resume_from is not None:
        path, meta = resume_from
        accelerator.load_state(str(path))
        state = torch.load(path / f"trainer_state_{accelerator.process_index}.pt", weights_only=False)
        kl_ctl.load_state_dict(state["kl_controller"])
        if state.get("rewards") is not None and hasattr(composer, "load_state_dict"):
            composer.load_state_dict(state["rewards"])
        schedule.load_state_dict(state["prompt_schedule"])
        if baseline is not None:
            baseline.load_state_dict(state["class_baseline"])
        if scale is not None and state.get("class_scale") is not None:
            scale.load_state_dict(state["class_scale"])
        shuffle.set_state(state["shuffle"])
        totals = dict(state["totals"])
        first_step = int(state["step"]) + 1
        kept = []
        if is_main:
            kept = _trim_jsonl(out / "history.jsonl", state["step"])
            _trim_jsonl(out / "samples.jsonl", state["step"])
            val_records = _trim_jsonl(out / VALIDATION_FILE, state["step"])
            for record in val_records:
                selector.offer(record)
            print(f"ppo: resuming from {path} at step {first_step}", file=sys.stderr)
        history = [{k: (math.nan if v is None else v) for k, v in row.items()} for row in kept]
    bar = tqdm(range(first_step, cfg.steps + 1), desc="ppo", disable=not is_main, dynamic_ncols=True,
               initial=first_step - 1, total=cfg.steps)
    unwrapped = accelerator.unwrap_model(model)

    def validate(step: int) -> None:
        """Greedy replies to this process's share of the validation prompts, counts summed over
        processes; log the rates and keep the policy when the selector prefers it."""
        mine = val_ds.select(range(accelerator.process_index, len(val_ds), world))
        with amp():
            replies = validation.greedy_replies(unwrapped.lm, tokenizer, mine["prompt"], cfg.val_max_new_tokens,
                                                cfg.max_prompt_length, cfg.val_batch_size)
        counts = validation.refusal_counts(mine["prompt_class"], replies).to(accelerator.device)
        record = validation.rates(step, accelerator.reduce(counts, reduction="sum").cpu())
        improved = selector.offer(record)
        record["selected"] = improved
        val_records.append(record)
        if is_main:
            with open(out / VALIDATION_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if trackers:
                accelerator.log({f"val/{k}": v for k, v in record.items() if k in validation.RATES and v is not None},
                                step=step)
            if improved and cfg.select != "last":
                staging = runs.staging_dir(cfg.output_dir, BEST_DIR)
                save_policy(unwrapped, tokenizer, staging, merge=cfg.lora, keep_training=True)
                validation.write_record(staging, record)
                runs.publish_dir(staging, out / BEST_DIR)
        accelerator.wait_for_everyone()

    if val_ds is not None and cfg.val_every and first_step == 1:
        validate(0)   # the starting model: the baseline, and a candidate
    for step in bar:
        step_start = time.perf_counter()
        # a prompt's responses sit next to each other: leave_one_out_centre relies on it
        rows = ds.select([i for i in schedule.next()[rank_slice] for _ in range(per_prompt)])
        with amp():
            ro = rollout(unwrapped, ref_lm, tokenizer, rows["prompt"], rows["prompt_class"], cfg)
        rollout_done = time.perf_counter()

        # Rewards: one composed score per response; NaN (no source applied) drops the row.
        total, info = composer(ro.prompts, ro.responses, ro.prompt_classes)
        score = torch.as_tensor(total, dtype=torch.float32, device=ro.logprobs.device)  # (B,)
        scored = torch.isfinite(score) & ~ro.empty                                     # (B,)
        mask = ro.response_mask * scored[:, None].long()                                # (B, T)
        score = torch.where(scored, score, torch.zeros_like(score))
        raw_score = score
        if per_prompt > 1:
            score = ppo_math.leave_one_out_centre(score, scored, per_prompt)
        elif baseline is not None:
            score = baseline(score, ro.prompt_classes, scored, all_reduce=(
                (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None))
        if scale is not None:
            score = scale(score, ro.prompt_classes, scored, all_reduce=(
                (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None))
        reward_done = time.perf_counter()
        rewards, kl = ppo_math.per_token_rewards(score, ro.logprobs, ro.ref_logprobs, mask, kl_ctl.value,
                                                 cfg.kl_estimator)                      # (B, T) each
        advantages, returns = ppo_math.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
            advantages = ppo_math.masked_whiten(advantages, mask, all_reduce=all_reduce)
        lr = ppo_math.scheduled_lr(cfg.learning_rate, step, cfg.steps, cfg.lr_schedule, cfg.lr_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_stats = ppo_update(model, optimizer, accelerator, ro, mask, advantages, returns, cfg, shuffle, amp)

        # Batch statistics, summed over processes so every process updates beta the same way.
        seq_kl = kl.sum(1)                                                              # (B,)
        sums = torch.tensor([
            float(seq_kl[scored].sum()), float(scored.sum()), float(raw_score[scored].sum()),
            float((~scored).sum()), float(ro.empty.sum()),
            float(ro.truncated.sum()), float(ro.response_mask.sum()), float(len(ro.responses)),
        ], device=accelerator.device)
        sums = accelerator.reduce(sums, reduction="sum").tolist()
        kl_sum, n_scored, score_sum, n_skipped, n_empty, n_trunc, n_tokens, n_resp = sums
        mean_kl = kl_sum / n_scored if n_scored else 0.0
        mean_score = score_sum / n_scored if n_scored else math.nan
        beta = kl_ctl.value
        kl_ctl.update(mean_kl, int(n_resp))
        totals["skipped"] += int(n_skipped)
        totals["empty"] += int(n_empty)
        totals["truncated"] += int(n_trunc)
        totals["responses"] += int(n_resp)

        metrics = {"step": step, "reward/score": mean_score, "objective/kl": mean_kl, "objective/kl_coef": beta,
                   "optim/lr": lr,
                   "objective/rlhf_reward": mean_score - beta * mean_kl if n_scored else math.nan,
                   "rollout/skipped": n_skipped, "rollout/empty": n_empty, "rollout/truncated": n_trunc,
                   "rollout/response_length": n_tokens / max(n_resp, 1), **info.metrics(), **loss_stats,
                   "time/step_s": time.perf_counter() - step_start, "time/rollout_s": rollout_done - step_start,
                   "time/reward_s": reward_done - rollout_done, "time/update_s": time.perf_counter() - reward_done,
                   **({f"baseline/{c}": v for c, v in baseline.mean.items()} if baseline is not None else {}),
                   **({f"scale/{c}_std": scale.std(c) for c in scale.var} if scale is not None else {})}
        history.append(metrics)
        bar.set_postfix(reward=f"{mean_score:.3f}", kl=f"{mean_kl:.3f}")
        if is_main:
            with open(out / "history.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in metrics.items()}) + "\n")
            if trackers and step % cfg.log_every == 0:
                accelerator.log({k: v for k, v in metrics.items() if k != "step" and math.isfinite(v)}, step=step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                    for i in range(len(ro.responses)):
                        f.write(json.dumps({
                            "step": step, "prompt": ro.prompts[i], "prompt_class": ro.prompt_classes[i],
                            "response": ro.responses[i], "truncated": bool(ro.truncated[i]),
                            "reward": _finite_or_none(total[i]),
                            "rewards": {name: _finite_or_none(raw[i]) for name, raw in info.raw.items()},
                            "kl": float(seq_kl[i]),
                        }) + "\n")
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            validate(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(accelerator, cfg, step, {
                "step": step, "kl_controller": kl_ctl.state_dict(),
                "rewards": composer.state_dict() if hasattr(composer, "state_dict") else None,
                "prompt_schedule": schedule.state_dict(), "shuffle": shuffle.get_state(), "totals": dict(totals),
                "class_baseline": baseline.state_dict() if baseline is not None else None,
                "class_scale": scale.state_dict() if scale is not None else None})
    bar.close()

    accelerator.wait_for_everyone()
    final = out / runs.MODEL_DIR
    chosen = selector.best if cfg.select != "last" else None
    if is_main:
        if chosen is not None:
            runs.publish_dir(out / BEST_DIR, final)
        else:
            staging = runs.staging_dir(cfg.output_dir)
            save_policy(unwrapped, tokenizer, staging, merge=cfg.lora)
            runs.publish_dir(staging, final)
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()

    def mean_of(key: str, part: list[dict]) -> Optional[float]:
        values = [h[key] for h in part if math.isfinite(h[key])]
        return sum(values) / len(values) if values else None

    k = max(1, min(5, len(history) // 2))
    summary = {
        "steps": len(history), "responses": totals["responses"], "skipped": totals["skipped"],
        "empty": totals["empty"], "truncated": totals["truncated"],
        "reward_first": mean_of("reward/score", history[:k]), "reward_last": mean_of("reward/score", history[-k:]),
        "kl_first": mean_of("objective/kl", history[:k]), "kl_last": mean_of("objective/kl", history[-k:]),
        "kl_coef_final": kl_ctl.value, "summary_window_steps": k,
        "world_size": accelerator.num_processes, "wall_time_s": timer.seconds,
        "selected_step": chosen["step"] if chosen else cfg.steps,
    }
    if val_records:
        summary["validation_start"] = val_records[0] if val_records[0]["step"] == 0 else None
        summary["validation_last"] = val_records[-1]
        summary["validation_selected"] = chosen
    if is_main:
        plot_history(history, out / "ppo_curves.png", val_records)
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


def cli(argv: list[str] | None = None) -> None:
    cfg = config_lib.parse(PPOConfig, argv, prog="rbrm ppo", description=__doc__)
    try:
        main(cfg)
    except RubricError as e:
        config_lib.fail("; ".join(e.problems))
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))


if __name__ == "__main__":
    cli()

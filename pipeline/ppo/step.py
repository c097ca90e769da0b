"""One PPO step's arithmetic, from the composed scores to the update.

:func:`advantages_from_scores` is pure (tensors in, a :class:`StepRecord` out): which responses
count, the baseline (the siblings' mean or the prompt class's), the class scaling, the per-token
KL penalty, GAE and whitening. :func:`ppo_update` takes ``ppo_epochs`` passes of clipped PPO
over shuffled mini-batches. Both call :mod:`pipeline.ppo.math` for every formula.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from pipeline.ppo import math as ppo_math
from pipeline.ppo.config import PPOConfig
from pipeline.ppo.policy import response_forward
from pipeline.ppo.rollout import Rollout

AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


@dataclasses.dataclass
class StepRecord:
    """One step's training signal (B responses of at most T tokens)."""

    scored: torch.Tensor      # (B,) bool: a finite composed score and a non-empty response
    mask: torch.Tensor        # (B, T) response mask with unscored rows zeroed: the tokens that train
    raw_score: torch.Tensor   # (B,) composed score, 0 where unscored
    score: torch.Tensor       # (B,) after the baseline (siblings' or class') and the class scaling
    kl: torch.Tensor          # (B, T) per-token KL estimate towards the reference
    rewards: torch.Tensor     # (B, T) -beta * kl, plus score at each response's last real token
    advantages: torch.Tensor  # (B, T) GAE advantages, whitened over real tokens when asked
    returns: torch.Tensor     # (B, T) advantages + values before whitening: the value targets


def advantages_from_scores(total: Sequence[float], ro: Rollout, cfg: PPOConfig, kl_coef: float,
                           baseline: Optional[ppo_math.ClassBaseline] = None,
                           scale: Optional[ppo_math.ClassScale] = None,
                           all_reduce: AllReduce = None) -> StepRecord:
    """``total`` (B,) composed scores (NaN: no source applied) and the rollout -> the step record.

    A response with a NaN score or no token at all is dropped from the update, never imputed.
    With ``num_generations`` > 1 each score is centred on its siblings' mean; otherwise on
    ``baseline`` (its class's moving average) when given. ``scale`` then evens out the classes.
    ``all_reduce`` sums a tensor over processes (None: one process), so class statistics and
    whitening see the global batch. ``baseline`` and ``scale`` update their running statistics.
    With ``refusal_centring`` > 0 the refusals (string match) and the other replies are then each
    centred on their own mean (:func:`pipeline.ppo.math.refusal_centre`).
    """
    score = torch.as_tensor(total, dtype=torch.float32, device=ro.logprobs.device)   # (B,)
    scored = torch.isfinite(score) & ~ro.empty                                         # (B,)
    mask = ro.response_mask * scored[:, None].long()                                   # (B, T)
    score = torch.where(scored, score, torch.zeros_like(score))
    raw_score = score
    if cfg.num_generations > 1:
        score = ppo_math.leave_one_out_centre(score, scored, cfg.num_generations)
    elif baseline is not None:
        score = baseline(score, ro.prompt_classes, scored, all_reduce=all_reduce)
    if scale is not None:
        score = scale(score, ro.prompt_classes, scored, all_reduce=all_reduce)
    if cfg.refusal_centring > 0:
        refused = torch.tensor(ro.refused, device=score.device)
        score = ppo_math.refusal_centre(score, refused, scored, cfg.refusal_centring, all_reduce=all_reduce)
    rewards, kl = ppo_math.per_token_rewards(score, ro.logprobs, ro.ref_logprobs, mask, kl_coef,
                                             cfg.kl_estimator)                         # (B, T) each
    advantages, returns = ppo_math.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = ppo_math.masked_whiten(advantages, mask, all_reduce=all_reduce)
    return StepRecord(scored, mask, raw_score, score, kl, rewards, advantages, returns)


def trimmed_columns(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[int, int]:
    """``(q, t)`` for rows that are left-padded prompts ``(b, P)`` and right-padded responses
    ``(b, T)``: columns ``< q`` of the prompts and ``>= t`` of the responses are padding in every
    row. Positions come from the attention mask, so dropping them changes no real token's value."""
    real_q = query_mask.bool().any(0)
    real_t = response_mask.bool().any(0)
    q = int(real_q.nonzero()[0]) if real_q.any() else query_mask.shape[1]
    t = int(real_t.nonzero()[-1]) + 1 if real_t.any() else 0
    return q, max(t, 1)


def ppo_update(model, optimizer, accelerator, ro: Rollout, mask: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, cfg: PPOConfig, generator: torch.Generator,
               amp: Callable[[], Any] = contextlib.nullcontext, demos=None) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped PPO over shuffled mini-batches of one rollout.

    ``amp`` makes the context the forward passes run in (bf16 autocast, or none). ``demos``
    (a :class:`pipeline.ppo.ptx.Demonstrations`) adds ``cfg.ptx_coef`` times a batch of
    demonstrations' negative log-likelihood to each mini-batch's loss (PPO-ptx).

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
            # The batch is padded to its longest prompt and response; this mini-batch's rows may
            # be shorter. Columns that are padding in every row change nothing but the cost.
            q, t = trimmed_columns(ro.query_mask[idx], ro.response_mask[idx])
            mb_mask = mb_mask[:, :t]
            with amp():
                new_logprobs, new_values = response_forward(model, ro.query_ids[idx, q:], ro.query_mask[idx, q:],
                                                            ro.response_ids[idx, :t], ro.response_mask[idx, :t],
                                                            cfg.temperature)
            pg_loss, pg_stats = ppo_math.policy_loss(new_logprobs, ro.logprobs[idx, :t], advantages[idx, :t], mb_mask,
                                                     cfg.clip_range, token_count)
            vf_loss, vf_stats = ppo_math.value_loss(new_values, ro.values[idx, :t], returns[idx, :t], mb_mask,
                                                    cfg.clip_range_value, token_count)
            loss = pg_loss + cfg.vf_coef * vf_loss
            extra = {}
            if demos is not None:
                with amp():
                    ptx_loss = demos.loss(model, mask.device)
                loss = loss + cfg.ptx_coef * ptx_loss
                extra["loss/ptx"] = ptx_loss
            accelerator.backward(loss)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in {"loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
                               "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"],
                               "value/clipfrac": vf_stats["vf_clipfrac"], **extra}.items():
                stats.setdefault(key, []).append(float(value.detach()))
    means = {k: sum(v) / len(v) for k, v in stats.items()}
    if world > 1 and means:
        # a process's loss is its token sum over (global tokens / world): their mean is the global loss
        keys = sorted(means)
        avg = accelerator.reduce(torch.tensor([means[k] for k in keys], device=mask.device), reduction="mean")
        means = dict(zip(keys, avg.tolist()))
    return means

"""The PPO arithmetic for RLHF, as pure tensor functions.

Everything the PPO trainer computes that can be checked with pencil and paper lives here:
masked statistics, KL estimators, the per-token reward, GAE, the clipped policy and value
losses, the KL-coefficient controllers and score normalisation. Nothing here knows about
models, tokenizers, accelerate or logging, so each function is tested against hand-worked
numbers in tests/test_ppo_math.py.

Conventions used throughout:

- ``B`` is the number of sampled responses, ``T`` the padded response length, ``V`` the
  vocabulary size. Position ``t`` is the ``t``-th generated token of a response.
- ``mask`` is ``(B, T)``, 1 for real response tokens and 0 for padding. Responses are
  right-padded: the real tokens of a row come first, padding after. It may be bool, int or
  float.
- ``logprobs`` are ``log pi(a_t | s_t)`` under the policy that sampled the response,
  ``ref_logprobs`` the same tokens under the frozen reference (SFT) model.

Sources: Schulman et al. 2017 (PPO clipped surrogate), Schulman et al. 2016 (GAE),
Ziegler et al. 2019 (per-token KL penalty and the adaptive KL coefficient), Huang et al.
2022/2024 (the implementation details of RLHF with PPO: value clipping, whitening,
reward placement at the last token), and Schulman's note "Approximating KL divergence"
(the k1/k2/k3 estimators).

Departures from the textbook: the value after a response's last real token is taken to be 0
(the episode ends at eos or at truncation; we do not bootstrap from a truncated response),
and a row with no real token (an empty response) receives no reward at all.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

# Added to variances before dividing, so a constant batch whitens to zeros instead of NaN.
_EPS = 1e-8


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: ``(B, T)`` (any shape works) values.
        mask: same shape as ``x``; 1 for real tokens, 0 for padding.
        dim: ``None`` for one mean over all real tokens (a 0-d tensor), or a dimension to
            reduce (``dim=1`` gives one mean per row, ``(B,)``).

    A slice with no real token has mean 0 rather than NaN, so an empty response does not
    poison a batch statistic.
    """
    mask = mask.to(x.dtype)
    # where(), not x * mask: padding may hold inf or NaN and 0 * inf is NaN.
    masked = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    if dim is None:
        total, count = masked.sum(), mask.sum()
    else:
        total, count = masked.sum(dim), mask.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=_EPS), torch.zeros_like(total))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is 1, as a 0-d tensor.

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)``; 1 for real tokens, 0 for padding.
        unbiased: divide the sum of squares by ``n - 1`` (Bessel) instead of ``n``, where
            ``n`` is the number of real tokens.

    With a single real token the unbiased estimate is undefined (0 / 0); we return the
    biased one, 0, instead, so whitening a one-token batch gives 0 rather than NaN.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        # torch.where keeps this on the device (no host sync on a Python `if`).
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=_EPS), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Scale ``x`` to unit variance (and zero mean) using statistics of its real tokens only.

    Args:
        x: ``(B, T)`` values, usually advantages.
        mask: ``(B, T)``; 1 for real tokens, 0 for padding.
        shift_mean: subtract the mean. With ``False`` only the scale changes and the mean
            is kept, which is how per-token rewards are whitened without changing their sign
            balance.
        all_reduce: under several processes, a function that sums a tensor over all of
            them; the mean and variance are then those of every process's real tokens, so
            the result does not depend on how a batch was split.

    Returns ``(B, T)``; padding positions are set to 0. Uses the unbiased variance; a
    batch with one real token (variance 0) comes back as that token's centred value, 0.
    """
    if all_reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    else:
        m = mask.to(x.dtype)
        real = mask != 0
        # Two passes, each summed over processes: the same arithmetic as masked_var.
        total, count = all_reduce(torch.stack([torch.where(real, x, torch.zeros_like(x)).sum(), m.sum()]))
        mean = torch.where(count > 0, total / count.clamp(min=_EPS), torch.zeros_like(total))
        sq = all_reduce(torch.where(real, (x - mean) ** 2, torch.zeros_like(x)).sum().reshape(1))[0]
        var = torch.where(count > 1, sq / (count - 1).clamp(min=_EPS), torch.zeros_like(sq))
    whitened = (x - mean) * torch.rsqrt(var + _EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor, token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``masked_mean(x, mask)``, or the masked sum divided by ``token_count`` when given.

    Data-parallel training averages gradients over processes. Dividing each process's sum
    by ``global_tokens / world_size`` makes that average the mean over every real token of
    the global mini-batch, equal to one process holding the whole batch, however unevenly
    the real tokens fall between processes.
    """
    if token_count is None:
        return masked_mean(x, mask)
    masked = torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros_like(x))
    return masked.sum() / token_count.clamp(min=_EPS)


# --------------------------------------------------------------------------- KL and rewards


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref), for tokens sampled from pi.

    Args:
        logprobs: ``(B, T)`` ``log pi(a_t | s_t)`` of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` ``log pi_ref(a_t | s_t)`` of the same tokens.
        kind: which estimator.

    Direction: the tokens come from pi, so these estimate the KL *from the policy to the
    reference*, ``KL(pi || pi_ref) = E_{a ~ pi}[log pi(a) - log pi_ref(a)]``. Following
    Schulman's note, write ``r = pi_ref(a) / pi(a)`` (the density ratio "other over
    sampler"), so ``log r = ref_logprobs - logprobs``:

    - ``k1 = -log r = logprobs - ref_logprobs``: unbiased, high variance, can be negative
      on a single sample.
    - ``k2 = 0.5 * (log r) ** 2``: biased (it is exact only to second order) but low
      variance and never negative.
    - ``k3 = (r - 1) - log r``: unbiased (``E[r] = 1`` under pi) and never negative,
      since ``log r <= r - 1``.

    Returns ``(B, T)``, unmasked: padding positions hold whatever the inputs give.
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        # expm1 is exact for small |log r|, where r - 1 would lose digits.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl estimator: expected one of {', '.join(KL_ESTIMATORS)}, got {kind!r}")


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token in each row of a ``(B, T)`` mask; -1 if none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


@torch.no_grad()
def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: Union[float, torch.Tensor],
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RLHF reward of Ziegler et al. 2019 / InstructGPT, spread over response tokens.

    ``reward_t = -kl_coef * KL_t``, and the sequence score is added at the last real
    token of the row: the score judges the whole response, so it arrives when the
    response ends, while the KL penalty is paid token by token.

    Args:
        score: ``(B,)`` one scalar per response (reward model / rubric composition).
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the rollout policy.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference model.
        mask: ``(B, T)``; 1 for real response tokens, 0 for padding.
        kl_coef: the KL penalty coefficient (beta), e.g. ``controller.value``.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`kl_estimate`.

    Returns:
        rewards: ``(B, T)`` per-token rewards, 0 at padding.
        kl: ``(B, T)`` per-token KL estimate, 0 at padding (``kl.sum(1)`` is the
            sequence KL that is logged and fed to the adaptive controller).

    A row whose mask is all zeros (an empty response) gets no KL and no score: all its
    rewards are 0, and it contributes nothing to GAE or the losses. The trainer should
    count such rows rather than rely on them being rewarded.
    """
    if score.dim() != 1 or score.shape[0] != logprobs.shape[0]:
        raise ValueError(f"score: expected shape ({logprobs.shape[0]},), got {tuple(score.shape)}")
    real = mask.bool()
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    kl = torch.where(real, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    last = _last_token_index(mask)
    has_token = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    bonus = torch.where(has_token, score.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards[rows, last.clamp(min=0)] += bonus
    return rewards, kl


# --------------------------------------------------------------------------- advantages


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`per_token_rewards`).
        values: ``(B, T)`` ``V(s_t)`` from the value head at rollout time.
        mask: ``(B, T)`` right-padded; 1 for real response tokens, 0 for padding.
        gamma: discount.
        lam: GAE lambda (0: one-step TD; 1: Monte Carlo return minus the value).

    Computed backwards over ``t``::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    where ``V_{t+1} = 0`` and ``A_{t+1} = 0`` after the last real token: the episode ends
    at eos or truncation. Padding positions are ignored (their rewards and values may hold
    anything) and get advantage 0 and return 0.

    Returns:
        advantages: ``(B, T)``.
        returns: ``(B, T)`` ``advantages + values``, the value-function targets.
    """
    real = mask.bool()
    if real.shape[1] > 1 and bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError("gae: mask must be right-padded (no real token after a padding token)")
    rewards = torch.where(real, rewards, torch.zeros_like(rewards))
    values = torch.where(real, values, torch.zeros_like(values))
    # With padding zeroed, the position after a row's last real token has V = 0 and A = 0,
    # which is exactly the terminal condition; no per-step mask is needed.
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = advantages + values
    return advantages, returns


# --------------------------------------------------------------------------- losses


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    token_count: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    Args:
        new_logprobs: ``(B, T)`` log-probs of the rollout tokens under the policy being
            optimised (carries gradient).
        old_logprobs: ``(B, T)`` the same tokens' log-probs at rollout time.
        advantages: ``(B, T)`` (usually whitened) advantages.
        mask: ``(B, T)``; 1 for real response tokens, 0 for padding.
        clip_range: epsilon; the ratio is clipped to ``[1 - eps, 1 + eps]``.
        token_count: see :func:`masked_token_mean` (data-parallel runs); None = this batch's.

    ``pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio)))``, the negated pessimistic
    (minimum) surrogate.

    Returns ``(pg_loss, stats)``; ``pg_loss`` is 0-d, stats are detached 0-d tensors:

    - ``clipfrac``: share of real tokens where the clipped term was chosen (its gradient
      is zero there).
    - ``approx_kl``: k3 estimate of KL(old || new) from the rollout samples,
      ``(ratio - 1) - log ratio`` with ``ratio = pi_new / pi_old``.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_token_mean(torch.max(pg_loss1, pg_loss2), mask, token_count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return pg_loss, stats


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    token_count: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (the PPO2 baselines variant described by Huang et al.).

    Args:
        new_values: ``(B, T)`` value-head outputs now (carries gradient).
        old_values: ``(B, T)`` value-head outputs at rollout time.
        returns: ``(B, T)`` targets from :func:`gae`.
        mask: ``(B, T)``; 1 for real response tokens, 0 for padding.
        clip_range_value: how far the new value may move from the old one before the
            clipped term takes over.
        token_count: see :func:`masked_token_mean` (data-parallel runs); None = this batch's.

    ``vf_loss = 0.5 * masked_mean(max((V - R)^2, (V_clipped - R)^2))`` with
    ``V_clipped = V_old + clip(V - V_old, -c, c)``.

    Returns ``(vf_loss, stats)``; stats: ``vf_clipfrac``, the share of real tokens where the
    clipped term was the larger one (detached, 0-d).
    """
    values_clipped = old_values + torch.clamp(new_values - old_values, -clip_range_value, clip_range_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_token_mean(torch.max(vf_losses1, vf_losses2), mask, token_count)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(vf_losses1.dtype), mask)}
    return vf_loss, stats


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under its logits.

    Args:
        logits: ``(B, T, V)``; ``logits[:, t]`` is the distribution that predicts
            ``labels[:, t]`` (the caller has already shifted by one position).
        labels: ``(B, T)`` token ids (int64).

    Returns ``(B, T)``. One ``log_softmax`` over the vocabulary, then a gather, so only one
    extra ``(B, T, V)`` tensor is alive at a time. Computing it in chunks of the batch
    would lower the peak further; with our model sizes that is not needed.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    logp = torch.log_softmax(logits, dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- learning rate

LR_SCHEDULES = ("constant", "linear")


def scheduled_lr(base: float, step: int, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of PPO step ``step`` (1-based) of ``steps``.

    ``linear`` anneals it from ``base`` at step 1 to ``base / steps`` at the last step, as the
    PPO paper does (Schulman et al. 2017, Atari: Adam's step size times a factor annealed
    linearly from 1 to 0). ``warmup`` > 0 also scales the first ``warmup`` steps by
    ``step / warmup``. Adam's first updates move every weight by about the full learning rate
    whatever the gradient's size (its second-moment estimate rests on one or two mini-batches),
    so without a warmup PPO's first step changed the policy about 16 times as much as the later
    ones. It depends on the step alone, so a resumed run needs no state for it.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if not 1 <= step <= steps:
        raise ValueError(f"step {step} outside 1..{steps}")
    if warmup < 0:
        raise ValueError(f"warmup {warmup}: expected a number of steps >= 0")
    lr = base if schedule == "constant" else base * (1.0 - (step - 1) / steps)
    return lr * min(1.0, step / warmup) if warmup else lr


# --------------------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A KL coefficient that never changes; the same interface as the adaptive one."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019, a proportional controller.

    After each batch, with ``KL`` the mean per-response KL of the batch::

        error = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + error * n_steps / horizon)

    so beta rises while the policy drifts further from the reference than ``target`` nats
    and falls while it stays closer. ``horizon`` (in samples) sets how fast: a sustained
    clipped error of 0.2 multiplies beta by about ``e^0.2`` every ``horizon`` samples.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL: target and horizon must be positive, got {target} and {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> None:
        """``current_kl``: mean KL per response of the batch just seen; ``n_steps``: its size
        in responses (episodes), summed over processes."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restores the coefficient; target and horizon stay as configured, so a resumed run
        may change them."""
        self.value = float(state["value"])


# --------------------------------------------------------------------------- score normalisation


class RunningMoments:
    """Mean and standard deviation of every score seen so far, updated a batch at a time.

    Batches are merged with the parallel-variance rule (Chan et al.): for the running
    ``(n_a, mean_a, M2_a)`` and a batch ``(n_b, mean_b, M2_b)``, with ``d = mean_b - mean_a``
    and ``n = n_a + n_b``::

        mean = mean_a + d * n_b / n
        M2   = M2_a + M2_b + d^2 * n_a * n_b / n

    ``var`` is ``M2 / n`` (population variance, numpy's default ``ddof=0``). State is kept in
    Python floats (double precision). Under several processes, pass all-gathered scores so
    every process holds the same statistics.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch ``x`` (any shape; every element is one observation)."""
        x = x.detach().reshape(-1).to(torch.float64)
        n_b = x.numel()
        if n_b == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("RunningMoments.update: scores must be finite (NaN means 'does not apply' and "
                             "must be resolved before normalisation)")
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m2 = self.var * n_a + m2_b + delta**2 * n_a * n_b / n
        self.mean += delta * n_b / n
        self.var = m2 / n
        self.count = n

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def group_sums(values: torch.Tensor, groups: torch.Tensor, scored: torch.Tensor, n_groups: int,
               all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``(2, n_groups)`` float64: per group, the sum of ``values`` ``(B,)`` over the scored rows
    whose ``groups`` ``(B,)`` index it holds, and how many there are; over every process when
    ``all_reduce`` (a sum) is given."""
    sums = torch.zeros(2, n_groups, dtype=torch.float64, device=values.device)
    sums[0].index_add_(0, groups[scored], values[scored].to(torch.float64))
    sums[1].index_add_(0, groups[scored], torch.ones_like(values[scored], dtype=torch.float64))
    return all_reduce(sums) if all_reduce is not None else sums


class ClassBaseline:
    """A baseline per prompt class: an exponential moving average of the class's scores.

    Subtracting a baseline that depends only on the prompt leaves the policy gradient
    unbiased and removes the part of the score the policy already earns as a matter of
    course. Without one, the value head (zero at the start, slow to learn) leaves the raw
    score as the advantage: when the policy already refuses nearly every harmful prompt, each
    of those refusals still counts as a large positive advantage, and as the refusal opening
    is shared with safe prompts, refusing goes up everywhere. Centred per class, an expected
    refusal of a harmful prompt is worth about 0 and only what differs from the class's usual
    outcome (a compliance there, a refusal of a safe prompt) moves the policy.

    For each class in a batch, with ``m`` the mean of its scored responses (summed over
    processes through ``all_reduce``)::

        centred = score - b           (b: the class's average before this batch; m for its first)
        b <- decay * b + (1 - decay) * m
    """

    def __init__(self, classes: Sequence[str], decay: float):
        self.classes = list(classes)
        self.decay = float(decay)
        self.mean: dict[str, float] = {}

    def __call__(self, score: torch.Tensor, classes: Sequence[str], scored: torch.Tensor,
                 all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``(B,)`` scores -> ``(B,)`` scores less their class's baseline (unscored rows unchanged)."""
        index = torch.tensor([self.classes.index(c) for c in classes], dtype=torch.long, device=score.device)
        sums = group_sums(score, index, scored, len(self.classes), all_reduce)
        batch_mean = {}
        for k, cls in enumerate(self.classes):
            if sums[1, k] > 0:
                batch_mean[cls] = float(sums[0, k] / sums[1, k])
        base = torch.tensor([self.mean.get(c, batch_mean.get(c, 0.0)) for c in classes], dtype=score.dtype,
                            device=score.device)
        for cls, m in batch_mean.items():
            self.mean[cls] = self.decay * self.mean[cls] + (1 - self.decay) * m if cls in self.mean else m
        return torch.where(scored, score - base, score)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = {str(k): float(v) for k, v in state["mean"].items()}


class ClassScale:
    """Put every prompt class's centred scores on the same scale, then weight the classes.

    After centring (:class:`ClassBaseline` or :func:`leave_one_out_centre`) a class's scores
    spread as widely as its rubric's rewards do and as often as the policy's replies to it
    differ: the demo's safe rubric spreads 3.0 between a refusal and an answer, the harmful one
    1.5-2.0, and a policy that refuses nearly every harmful prompt gives that class almost no
    spread at all. Whitened together, the class with the wider spread moves the shared refusal
    threshold and the other barely counts. Here each class is divided by a moving average of
    its own spread, so a rare compliance with a harmful prompt weighs as much as a rare refusal
    of a safe one, and then multiplied by its ``weights`` entry (default 1)::

        v_c <- decay * v_c + (1 - decay) * mean over the batch's class-c rows of centred^2
        scaled = weight_c * centred / max(sqrt(v_c), min_std)       (v_c: the batch's own at first)

    ``min_std`` (in reward units) keeps a class whose replies all scored alike from having its
    float noise blown up. With ``normalise=False`` only the weights apply. Unscored rows are left
    as they are.
    """

    def __init__(self, classes: Sequence[str], decay: float, weights: Optional[dict[str, float]] = None,
                 min_std: float = 0.05, normalise: bool = True):
        self.classes = list(classes)
        self.normalise = normalise
        self.decay = float(decay)
        self.weights = dict(weights or {})
        self.min_std = float(min_std)
        self.var: dict[str, float] = {}

    def __call__(self, centred: torch.Tensor, classes: Sequence[str], scored: torch.Tensor,
                 all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``(B,)`` centred scores -> ``(B,)`` scores scaled per class (unscored rows unchanged)."""
        index = torch.tensor([self.classes.index(c) for c in classes], dtype=torch.long, device=centred.device)
        sums = group_sums(centred.to(torch.float64) ** 2, index, scored, len(self.classes), all_reduce)
        for k, cls in enumerate(self.classes):
            if sums[1, k] > 0:
                m = float(sums[0, k] / sums[1, k])
                self.var[cls] = self.decay * self.var[cls] + (1 - self.decay) * m if cls in self.var else m
        factor = torch.tensor([self.weights.get(c, 1.0) / self.std(c) for c in classes], dtype=centred.dtype, device=centred.device)
        return torch.where(scored, centred * factor, centred)

    def std(self, cls: str) -> float:
        """The spread class ``cls``'s scores are divided by (1 when not normalising or not seen yet)."""
        if not self.normalise or cls not in self.var:
            return 1.0
        return max(math.sqrt(self.var[cls]), self.min_std)

    def state_dict(self) -> dict[str, Any]:
        return {"var": dict(self.var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.var = {str(k): float(v) for k, v in state["var"].items()}


class RefusalHold:
    """A Lagrange multiplier per prompt class that holds the share of its rollouts that refuse.

    With ``targets`` ``{"harmful": 0.9}``: after each step's rollout, the class's multiplier
    ``lam_c`` (the factor on its weight in :class:`ClassScale`) moves in log space by the
    shortfall of its refusal share::

        log lam_c <- clip(log lam_c + rate * (target_c - share_c), 0, log max_weight)

    so it grows while the class refuses less than asked and shrinks back to 1 once it refuses
    more. Why: a 135M policy moves one refusal threshold for every class, and a class that already
    refuses nearly always gives PPO almost no gradient, so the safe prompts' "answer more" pulls
    the threshold down until harmful refusals are lost (most seeds of the demo config slid so).
    Held this way, PPO may only lower safe refusals as far as it learns to tell the classes apart.
    Measured on the demo it did not: at the cap of 5 the harmful refusals still slid (run M in
    docs/results.md), so the shipped config anchors them with PPO-ptx instead (``ptx_classes``).
    The constrained-optimisation reading is Safe RLHF's (Dai et al. 2023), with the refusal share
    as the constraint instead of a cost model.
    """

    def __init__(self, targets: dict[str, float], rate: float, max_weight: float):
        self.targets = dict(targets)
        self.rate = float(rate)
        self.max_log = math.log(max_weight)
        self.log_lam: dict[str, float] = {c: 0.0 for c in self.targets}
        self.share: dict[str, float] = {}

    def update(self, refused: dict[str, float], seen: dict[str, float]) -> None:
        """``refused[c]`` of ``seen[c]`` rollouts of class ``c`` refused this step (a class not seen
        keeps its multiplier)."""
        for c, target in self.targets.items():
            if seen.get(c, 0) > 0:
                self.share[c] = refused.get(c, 0.0) / seen[c]
                step = self.log_lam[c] + self.rate * (target - self.share[c])
                self.log_lam[c] = min(max(step, 0.0), self.max_log)

    @property
    def weights(self) -> dict[str, float]:
        return {c: math.exp(v) for c, v in self.log_lam.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"log_lam": dict(self.log_lam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lam.update({str(k): float(v) for k, v in state["log_lam"].items()})


def leave_one_out_centre(score: torch.Tensor, scored: torch.Tensor, group_size: int) -> torch.Tensor:
    """Centre each score on the mean score of the other responses to the same prompt.

    This is RLOO's baseline (Ahmadian et al. 2024; Kool et al. 2019): the batch holds
    ``group_size`` responses per prompt, next to each other, and each response is judged
    against its siblings, so the baseline is unbiased (it never sees the response itself)
    and specific to the prompt. A prompt whose responses all score alike gives ~0 to every
    one of them; only prompts where sampling went both ways (refused once, answered once)
    push the policy, and they push it on that prompt's side of the refusal line. A class
    baseline (:class:`ClassBaseline`) cannot tell a safe prompt the policy nearly always
    answers from one it nearly always refuses; this one can.

    ``(B,)`` scores and ``scored`` flags -> ``(B,)`` centred scores. Unscored rows stay as
    they are and are left out of their siblings' baseline; a scored row with no scored
    sibling gets 0 (there is nothing to compare it with).
    """
    if group_size < 1 or score.shape[0] % group_size:
        raise ValueError(f"{score.shape[0]} scores do not split into groups of {group_size}")
    s = torch.where(scored, score, torch.zeros_like(score)).view(-1, group_size)
    m = scored.view(-1, group_size).to(score.dtype)
    others_sum = s.sum(1, keepdim=True) - s
    others_n = m.sum(1, keepdim=True) - m
    centred = torch.where(others_n > 0, s - others_sum / others_n.clamp(min=1), torch.zeros_like(s))
    return torch.where(scored, centred.reshape(-1), score)


def whiten_and_clip_scores(
    scores: torch.Tensor, clip: Optional[float] = None, running: Optional[RunningMoments] = None,
    pool: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Normalise sequence scores to zero mean and unit spread, optionally clipping them.

    Args:
        scores: ``(B,)`` one score per response.
        clip: if set, normalised scores are clipped to ``[-clip, clip]``.
        running: statistics kept across batches. It is updated with ``pool`` first, then
            used, so the current batch counts. Without it, the pool's own mean and
            standard deviation are used (a batch of one then normalises to 0).
        pool: the values the statistics are taken from; default ``scores``. Under several
            processes pass every process's scores, so all normalise with the same numbers.

    Returns ``(B,)`` ``(scores - mean) / (std + 1e-8)``, clipped when asked.
    """
    stats = running if running is not None else RunningMoments()
    stats.update(scores if pool is None else pool)
    normalised = (scores - stats.mean) / (stats.std + _EPS)
    if clip is not None:
        normalised = torch.clamp(normalised, -clip, clip)
    return normalised


def refusal_centre(score: torch.Tensor, refused: torch.Tensor, scored: torch.Tensor, strength: float = 1.0,
                   all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Centre the step's refusals on their own mean score and its other replies on theirs.

    Every refusal shares a few opening tokens whatever the prompt, so the sum of the advantages
    that refusals carry moves the policy's readiness to refuse everywhere at once (one
    threshold), and only the differences between them say *where* to refuse. Taking each
    group's mean out leaves those differences: a refused harmful prompt scores above a refused
    safe one, an answered safe prompt above an answered harmful one, and the two groups' sums,
    which would shift the threshold, are zero. ``strength`` in [0, 1] takes that share of each
    group's mean out (0: unchanged). This is a baseline that depends on the reply, so it is no
    longer an unbiased estimate of the reward's gradient: by design it gives up the push on
    how often to refuse, which the KL term and PPO-ptx leave near the SFT model's.

    ``(B,)`` scores, ``refused`` and ``scored`` flags -> ``(B,)`` centred scores; group means are
    over scored rows of every process (``all_reduce`` sums); unscored rows stay as they are.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    group = (~refused.to(torch.bool)).long()                       # 0 refused, 1 answered
    sums = group_sums(score, group, scored, 2, all_reduce)
    means = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.zeros_like(sums[0]))
    shift = torch.where(scored, means[group].to(score.dtype), torch.zeros_like(score))
    return score - strength * shift

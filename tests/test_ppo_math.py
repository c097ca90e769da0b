"""Hand-worked checks of the PPO arithmetic in pipeline/ppo/math.py.

Every expected number is derived in the comments next to it, from the formulas in the
papers, not from running the code. Padding positions deliberately hold large or non-finite
values, so a function that lets padding leak in fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.ppo.math import (
    refusal_centre,
    ClassBaseline,
    ClassScale,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_estimate,
    leave_one_out_centre,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    scheduled_lr,
    value_loss,
    whiten_and_clip_scores,
)

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# --------------------------------------------------------------------------- masked statistics

# Row 0 is a full response 1, 2, 3; row 1 has one real token, 6, then padding (99, -7).
X = T([[1.0, 2.0, 3.0], [6.0, 99.0, -7.0]])
M = T([[1, 1, 1], [1, 0, 0]])


def test_masked_mean_over_all_and_per_row():
    # Real values 1, 2, 3, 6: sum 12 over 4 tokens = 3.
    close(masked_mean(X, M), 3.0)
    # Row 0: 6 / 3 = 2; row 1: 6 / 1 = 6.
    close(masked_mean(X, M, dim=1), [2.0, 6.0])
    # Bool masks work the same way.
    close(masked_mean(X, M.bool()), 3.0)


def test_masked_mean_of_empty_row_is_zero():
    x = T([[1.0, 2.0], [float("nan"), float("inf")]])
    mask = T([[1, 1], [0, 0]])
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])
    close(masked_mean(x, mask), 1.5)


def test_masked_var():
    # Deviations from the mean 3: -2, -1, 0, 3; squares 4, 1, 0, 9 sum to 14.
    close(masked_var(X, M, unbiased=False), 14 / 4)  # 3.5
    close(masked_var(X, M, unbiased=True), 14 / 3)  # 4.666...


def test_masked_whiten():
    # (x - 3) / sqrt(14 / 3); padding comes back as 0.
    s = math.sqrt(14 / 3)
    close(masked_whiten(X, M), [[-2 / s, -1 / s, 0.0], [3 / s, 0.0, 0.0]])
    # Without the shift the mean 3 is kept: (x - 3) / s + 3.
    close(masked_whiten(X, M, shift_mean=False), [[-2 / s + 3, -1 / s + 3, 3.0], [3 / s + 3, 0.0, 0.0]])


def test_masked_stats_with_one_real_token_are_finite():
    x = T([[5.0, 100.0, -100.0]])
    mask = T([[1, 0, 0]])
    close(masked_mean(x, mask), 5.0)
    # Unbiased variance of one sample is 0/0; we define it as 0, and whitening gives 0.
    close(masked_var(x, mask), 0.0)
    close(masked_whiten(x, mask), [[0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- GAE


def test_gae_full_row_by_hand():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    # r = [1.0, -0.5, 2.0], V = [0.5, 1.0, 1.5]; V after the last token is 0.
    # t=2: delta = 2.0 + 0.9*0   - 1.5 = 0.5                A2 = 0.5
    # t=1: delta = -0.5 + 0.9*1.5 - 1.0 = -0.15             A1 = -0.15 + 0.72*0.5  = 0.21
    # t=0: delta = 1.0 + 0.9*1.0 - 0.5 = 1.4                A0 = 1.4   + 0.72*0.21 = 1.5512
    # returns = A + V = [2.0512, 1.21, 2.0]
    adv, ret = gae(T([[1.0, -0.5, 2.0]]), T([[0.5, 1.0, 1.5]]), T([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv, [[1.5512, 0.21, 0.5]])
    close(ret, [[2.0512, 1.21, 2.0]])


def test_gae_padded_row_ends_at_last_real_token():
    # Row 1 has two real tokens; its padded slot holds r = 7, V = 9, which must be ignored.
    # Row 1, t=1: delta = -0.5 + 0.9*0 - 1.0 = -1.5        A1 = -1.5
    #        t=0: delta = 1.0 + 0.9*1.0 - 0.5 = 1.4         A0 = 1.4 + 0.72*(-1.5) = 0.32
    #        returns = [0.32 + 0.5, -1.5 + 1.0, 0] = [0.82, -0.5, 0]
    # Row 0 is the full row above, unchanged by sharing the batch.
    rewards = T([[1.0, -0.5, 2.0], [1.0, -0.5, 7.0]])
    values = T([[0.5, 1.0, 1.5], [0.5, 1.0, 9.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[1.5512, 0.21, 0.5], [0.32, -1.5, 0.0]])
    close(ret, [[2.0512, 1.21, 2.0], [0.82, -0.5, 0.0]])


def test_gae_limits_lambda_zero_and_one():
    rewards, values, mask = T([[1.0, -0.5, 2.0]]), T([[0.5, 1.0, 1.5]]), T([[1, 1, 1]])
    # lam = 0: A_t = delta_t = [1.4, -0.15, 0.5] (deltas from the hand example).
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[1.4, -0.15, 0.5]])
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t = [2.5-0.5, 1.5-1.0, 2.0-1.5].
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[2.0, 0.5, 0.5]])
    close(ret, [[2.5, 1.5, 2.0]])


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), T([[0, 1, 1]]), gamma=1.0, lam=1.0)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # Token 0: pi = 0.5, pi_ref = 0.25, so r = pi_ref / pi = 0.5, log r = -ln 2.
    #   k1 = -log r = ln 2 = 0.693147;  k2 = 0.5 (ln 2)^2 = 0.240227
    #   k3 = (r - 1) - log r = -0.5 + ln 2 = 0.193147
    # Token 1: pi = 0.25, pi_ref = 0.5, so r = 2, log r = ln 2.
    #   k1 = -ln 2;  k2 = 0.5 (ln 2)^2;  k3 = 1 - ln 2 = 0.306853
    # (A swapped direction would give k1 the wrong sign and exchange the two k3 values.)
    logprobs = torch.log(T([[0.5, 0.25]]))
    ref_logprobs = torch.log(T([[0.25, 0.5]]))
    ln2 = math.log(2)
    close(kl_estimate(logprobs, ref_logprobs, "k1"), [[ln2, -ln2]])
    close(kl_estimate(logprobs, ref_logprobs, "k2"), [[0.5 * ln2**2, 0.5 * ln2**2]])
    close(kl_estimate(logprobs, ref_logprobs, "k3"), [[-0.5 + ln2, 1 - ln2]])
    close(kl_estimate(logprobs, logprobs, "k3"), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logprobs, ref_logprobs, "k4")


def test_k3_and_k2_are_never_negative():
    g = torch.Generator().manual_seed(0)
    logprobs = -10 * torch.rand(1000, 50, generator=g)
    ref_logprobs = -10 * torch.rand(1000, 50, generator=g)
    assert (kl_estimate(logprobs, ref_logprobs, "k3") >= 0).all()
    assert (kl_estimate(logprobs, ref_logprobs, "k2") >= 0).all()
    # k1 is not: it is negative wherever the reference likes the token more.
    assert (kl_estimate(logprobs, ref_logprobs, "k1") < 0).any()


def test_k1_and_k3_estimate_kl_from_policy_to_reference():
    # pi = [0.7, 0.2, 0.1], pi_ref = [0.2, 0.3, 0.5]:
    # KL(pi || pi_ref) = 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2 = 0.876939 - 0.081093 - 0.160944 = 0.634902
    # KL(pi_ref || pi) = 0.2 ln(2/7) + 0.3 ln 1.5 + 0.5 ln 5 = -0.250553 + 0.121640 + 0.804719 = 0.675806
    # Averages over samples from pi must land on the first, not the second.
    pi, pi_ref = T([0.7, 0.2, 0.1], dtype=torch.float64), T([0.2, 0.3, 0.5], dtype=torch.float64)
    forward = 0.7 * math.log(3.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(pi, 400_000, replacement=True, generator=g)
    logprobs, ref_logprobs = torch.log(pi[tokens])[None], torch.log(pi_ref[tokens])[None]
    for kind in ("k1", "k3"):
        close(kl_estimate(logprobs, ref_logprobs, kind).mean(), forward, atol=0.01)


# --------------------------------------------------------------------------- per-token rewards


def test_per_token_rewards_places_score_on_last_real_token():
    # kl_coef = 0.1, k1 = logprobs - ref_logprobs.
    # Row 0 (3 real tokens): kl = [-1.0+1.5, -2.0+1.0, -0.5+0.5] = [0.5, -1.0, 0.0]
    #   rewards = -0.1 * kl = [-0.05, 0.1, 0.0], plus score 2.0 at t=2 -> [-0.05, 0.1, 2.0]
    # Row 1 (1 real token): kl = [-1.0+2.0, pad, pad] = [1.0, 0, 0]
    #   rewards = [-0.1, 0, 0], plus score -1.0 at t=0 -> [-1.1, 0, 0]
    # Row 2 (empty response): no KL, no score -> all 0 despite score 5.0.
    logprobs = T([[-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = T([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0], [-9.0, -9.0, -9.0]])
    mask = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    score = T([2.0, -1.0, 5.0])
    rewards, kl = per_token_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [-1.1, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_per_token_rewards_with_k3():
    # One token, pi = 0.5, pi_ref = 0.25: k3 = ln 2 - 0.5 (see the estimator test).
    # reward = -0.2 * (ln 2 - 0.5) + 1.0 (score at the only token).
    logprobs, ref_logprobs = torch.log(T([[0.5, 0.5]])), torch.log(T([[0.25, 0.25]]))
    rewards, kl = per_token_rewards(T([1.0]), logprobs, ref_logprobs, T([[1, 0]]), kl_coef=0.2, kl_estimator="k3")
    k3 = math.log(2) - 0.5
    close(kl, [[k3, 0.0]])
    close(rewards, [[-0.2 * k3 + 1.0, 0.0]])


# --------------------------------------------------------------------------- policy loss

# Six real tokens and one padding slot; old_logprobs = 0, so ratio = exp(new_logprobs).
RATIOS = [1.1, 1.5, 0.9, 0.5, 0.5, 1.5, 7.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 100.0]
PG_MASK = [1, 1, 1, 1, 1, 1, 0]


def test_policy_loss_clipping_by_hand():
    # clip_range 0.2, so clip(ratio) lies in [0.8, 1.2]. Per token, pg1 = -A r, pg2 = -A clip(r):
    #   A=+1 r=1.1 (inside):        pg1=-1.1 pg2=-1.1 -> max -1.1, not clipped
    #   A=+1 r=1.5 (above):         pg1=-1.5 pg2=-1.2 -> max -1.2, clipped
    #   A=-1 r=0.9 (inside):        pg1= 0.9 pg2= 0.9 -> max  0.9, not clipped
    #   A=-1 r=0.5 (below):         pg1= 0.5 pg2= 0.8 -> max  0.8, clipped
    #   A=+1 r=0.5 (below, worse):  pg1=-0.5 pg2=-0.8 -> max -0.5, not clipped (pessimistic)
    #   A=-1 r=1.5 (above, worse):  pg1= 1.5 pg2= 1.2 -> max  1.5, not clipped
    # pg_loss = (-1.1 - 1.2 + 0.9 + 0.8 - 0.5 + 1.5) / 6 = 0.4 / 6; clipfrac = 2 / 6.
    # approx_kl = mean of (r - 1) - ln r over the six ratios.
    new_logprobs = torch.log(T([RATIOS])).requires_grad_(True)
    loss, stats = policy_loss(new_logprobs, torch.zeros(1, 7), T([ADVANTAGES]), T([PG_MASK]), clip_range=0.2)
    close(loss, 0.4 / 6)
    close(stats["clipfrac"], 2 / 6)
    k3 = [(r - 1) - math.log(r) for r in RATIOS[:6]]
    close(stats["approx_kl"], sum(k3) / 6)

    # Gradient: d(-A r)/d(log r) = -A r on unclipped tokens, divided by 6; 0 on clipped tokens
    # (where the clamped ratio is chosen) and on padding.
    loss.backward()
    expected = [-a * r / 6 for a, r in zip(ADVANTAGES[:6], RATIOS[:6])] + [0.0]
    expected[1] = expected[3] = 0.0
    close(new_logprobs.grad, [expected])


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    # r = 1 everywhere: loss = -mean(A) over real tokens = -(1 + 3) / 2 = -2; nothing clipped.
    loss, stats = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), T([[1.0, 3.0, 50.0]]), T([[1, 1, 0]]), 0.2)
    close(loss, -2.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipping_by_hand():
    # clip_range_value 0.2, old values 1.0, so V_clipped lies in [0.8, 1.2].
    #   V=1.1 R=2: unclipped (1.1-2)^2 = 0.81, clipped 0.81           -> 0.81, not clipped
    #   V=1.5 R=2: unclipped (1.5-2)^2 = 0.25, clipped (1.2-2)^2 = 0.64 -> 0.64, clipped
    #   V=0.5 R=2: unclipped (0.5-2)^2 = 2.25, clipped (0.8-2)^2 = 1.44 -> 2.25, not clipped
    #   V=1.5 R=1: unclipped (1.5-1)^2 = 0.25, clipped (1.2-1)^2 = 0.04 -> 0.25, not clipped
    # vf_loss = 0.5 * (0.81 + 0.64 + 2.25 + 0.25) / 4 = 0.5 * 0.9875 = 0.49375; vf_clipfrac = 1/4.
    new_values = T([[1.1, 1.5, 0.5, 1.5, 40.0]])
    old_values = T([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = T([[2.0, 2.0, 2.0, 1.0, -40.0]])
    loss, stats = value_loss(new_values, old_values, returns, T([[1, 1, 1, 1, 0]]), clip_range_value=0.2)
    close(loss, 0.49375)
    close(stats["vf_clipfrac"], 0.25)


def test_value_loss_without_movement_is_half_mse():
    # new == old: both terms equal (V - R)^2; 0.5 * ((1-3)^2 + (2-2)^2) / 2 = 1.0.
    v = T([[1.0, 2.0]])
    loss, stats = value_loss(v, v, T([[3.0, 2.0]]), T([[1, 1]]), clip_range_value=0.2)
    close(loss, 1.0)
    close(stats["vf_clipfrac"], 0.0)


# --------------------------------------------------------------------------- log-probs


def test_logprobs_from_logits_by_hand():
    # Logits [0, ln 3] -> probabilities [1/4, 3/4]; logits [0, 0] -> [1/2, 1/2].
    logits = T([[[0.0, math.log(3)], [0.0, 0.0]]])
    labels = T([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]])
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, T([[1, 0, 0]]))


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_moves_by_the_exact_factor():
    # target 6, horizon 10000, batch of 256 responses.
    # KL 9:   error = 9/6 - 1 = 0.5, clipped to 0.2  -> beta *= 1 + 0.2 * 256/10000 = 1.00512
    # KL 5.4: error = 5.4/6 - 1 = -0.1 (inside clip)  -> beta *= 1 - 0.1 * 256/10000 = 0.99744
    # KL 0:   error = -1, clipped to -0.2            -> beta *= 1 - 0.2 * 256/10000 = 0.99488
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)
    close(ctl.value, 0.2 * 1.00512, atol=1e-12)
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(torch.tensor(5.4), n_steps=256)  # a float32 tensor: 5.4 is stored to ~1e-7
    close(ctl.value, 0.2 * 0.99744, atol=1e-9)
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(0.0, n_steps=256)
    close(ctl.value, 0.2 * 0.99488, atol=1e-12)
    # At the target nothing changes.
    ctl.update(6.0, n_steps=256)
    close(ctl.value, 0.2 * 0.99488, atol=1e-12)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(9.0, 256)
    resumed = AdaptiveKLController(0.05, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.1


# --------------------------------------------------------------------------- learning rate


def test_scheduled_lr_constant_and_linear_by_hand():
    assert [scheduled_lr(0.4, s, 4) for s in (1, 2, 3, 4)] == [0.4] * 4
    # linear: factor 1 - (step - 1) / steps, so 1, 3/4, 1/2, 1/4 of the base over 4 steps
    assert [scheduled_lr(0.4, s, 4, "linear") for s in (1, 2, 3, 4)] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="cosine"):
        scheduled_lr(0.4, 1, 4, "cosine")
    with pytest.raises(ValueError, match="outside"):
        scheduled_lr(0.4, 5, 4, "linear")


def test_scheduled_lr_warmup_scales_the_first_steps_only():
    # warmup 2: step 1 at half the rate, then the schedule itself
    assert [scheduled_lr(0.4, s, 4, warmup=2) for s in (1, 2, 3, 4)] == pytest.approx([0.2, 0.4, 0.4, 0.4])
    assert [scheduled_lr(0.4, s, 4, "linear", warmup=3) for s in (1, 2, 3, 4)] == pytest.approx(
        [0.4 / 3, 0.3 * 2 / 3, 0.2, 0.1])
    with pytest.raises(ValueError, match="warmup -1"):
        scheduled_lr(0.4, 1, 4, warmup=-1)


# --------------------------------------------------------------------------- score normalisation


def test_running_moments_match_numpy_over_concatenated_batches():
    batches = [[1.0, 2.0, 3.0], [4.0, 5.0], [10.0, -2.0, 0.0, 7.0], [3.5]]
    moments = RunningMoments()
    for i, b in enumerate(batches):
        moments.update(T(b))
        seen = np.concatenate(batches[: i + 1])
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), abs=1e-12)
        assert moments.std == pytest.approx(np.std(seen), abs=1e-12)
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    resumed.update(T([100.0]))
    allx = np.concatenate(batches + [[100.0]])
    assert resumed.mean == pytest.approx(np.mean(allx)) and resumed.std == pytest.approx(np.std(allx))


def test_running_moments_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        RunningMoments().update(T([1.0, float("nan")]))


def test_whiten_and_clip_scores():
    # Scores 0, 2, 4, 10: mean 4, deviations -4, -2, 0, 6, population variance (16+4+0+36)/4 = 14.
    # Normalised: [-4, -2, 0, 6] / sqrt(14) = [-1.0690, -0.5345, 0, 1.6036]; clip 1.5 caps the last.
    s = math.sqrt(14)
    scores = T([0.0, 2.0, 4.0, 10.0], dtype=torch.float64)
    close(whiten_and_clip_scores(scores), [-4 / s, -2 / s, 0.0, 6 / s])
    close(whiten_and_clip_scores(scores, clip=1.5), [-4 / s, -2 / s, 0.0, 1.5])
    # With running statistics that already saw 0, 2: they now cover 0, 2, 0, 2, 4, 10,
    # mean 18/6 = 3, deviations -3,-1,-3,-1,1,7, variance (9+1+9+1+1+49)/6 = 70/6.
    running = RunningMoments()
    running.update(T([0.0, 2.0]))
    out = whiten_and_clip_scores(scores, running=running)
    sr = math.sqrt(70 / 6)
    close(out, [-3 / sr, -1 / sr, 1 / sr, 7 / sr])
    assert running.count == 6


def test_class_baseline_centres_each_class_on_its_own_average():
    base = ClassBaseline(["harmful", "safe"], decay=0.5)
    # Batch 1: harmful 1.0 and 0.6 (mean 0.8), safe -1.0, and an unscored harmful row. A class's
    # first batch is centred on its own mean; the unscored row is left alone and not counted.
    scored = torch.tensor([True, True, True, False])
    out = base(T([1.0, 0.6, -1.0, 0.0]), ["harmful", "harmful", "safe", "harmful"], scored)
    close(out, [0.2, -0.2, 0.0, 0.0])
    assert base.mean == pytest.approx({"harmful": 0.8, "safe": -1.0})
    # Batch 2 is centred on the averages from before it, which then move halfway to its means:
    # harmful 0.0 - 0.8; safe 1.0 + 1.0 and 0.0 + 1.0; harmful -> 0.4, safe -> (-1.0 + 0.5) / 2.
    resumed = ClassBaseline(["harmful", "safe"], decay=0.5)
    resumed.load_state_dict(base.state_dict())
    for b in (base, resumed):
        out = b(T([0.0, 1.0, 0.0]), ["harmful", "safe", "safe"], torch.tensor([True, True, True]))
        close(out, [-0.8, 2.0, 1.0])
        assert b.mean == pytest.approx({"harmful": 0.4, "safe": -0.25})
    # Under several processes the class sums are reduced first: here a second process holding
    # harmful 3.0 makes the batch's harmful mean (0 + 3) / 2 = 1.5.
    other = torch.tensor([[3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    base(T([0.0]), ["harmful"], torch.tensor([True]), all_reduce=lambda sums: sums + other)
    assert base.mean["harmful"] == pytest.approx(0.5 * 0.4 + 0.5 * 1.5)


def test_refusal_centre_by_hand():
    # Refusals: a harmful one at 0.2 and a safe one at -1.8 (mean -0.8); answers: safe 1.0, harmful
    # -1.0, sensitive 0.6 (mean 0.2); the last row is unscored and stays as it is.
    score = T([0.2, -1.8, 1.0, -1.0, 0.6, 5.0])
    refused = torch.tensor([True, True, False, False, False, True])
    scored = torch.tensor([True, True, True, True, True, False])
    out = refusal_centre(score, refused, scored)
    close(out, [1.0, -1.0, 0.8, -1.2, 0.4, 5.0])
    # each group's scores now sum to zero: nothing is left to move the refusal threshold
    assert float(out[:2].sum()) == pytest.approx(0.0, abs=1e-6)
    assert float(out[2:5].sum()) == pytest.approx(0.0, abs=1e-6)
    close(refusal_centre(score, refused, scored, strength=0.5), [0.6, -1.4, 0.9, -1.1, 0.5, 5.0])
    close(refusal_centre(score, refused, scored, strength=0.0), score.tolist())
    # a second process holding one refusal scored -0.8 and no answer leaves the refusal mean at -0.8
    other = torch.tensor([[-0.8, 0.0], [1.0, 0.0]], dtype=torch.float64)  # (sums, counts) x (refused, answered)
    close(refusal_centre(score, refused, scored, all_reduce=lambda s: s + other)[:2], [1.0, -1.0])
    with pytest.raises(ValueError, match="strength"):
        refusal_centre(score, refused, scored, strength=1.5)


def test_leave_one_out_centre_by_hand():
    # two prompts x two responses: each response against its sibling
    close(leave_one_out_centre(T([1.0, 3.0, 2.0, 2.0]), torch.ones(4, dtype=torch.bool), 2), [-2.0, 2.0, 0.0, 0.0])
    # one prompt x four responses: 1 - (3 + 2 + 2) / 3, 3 - 5 / 3, 2 - 2, 2 - 2
    close(leave_one_out_centre(T([1.0, 3.0, 2.0, 2.0]), torch.ones(4, dtype=torch.bool), 4),
          [-4 / 3, 4 / 3, 0.0, 0.0])
    # an unscored response (its score is a placeholder) stays as it is and is not anyone's baseline;
    # a scored response whose only sibling is unscored has nothing to compare with and gets 0
    scored = torch.tensor([True, True, False, True, False, True])
    out = leave_one_out_centre(T([1.0, 4.0, 99.0, 5.0, 7.0, 2.0]), scored, 3)
    close(out, [1.0 - 4.0, 4.0 - 1.0, 99.0, 5.0 - 2.0, 7.0, 2.0 - 5.0])
    lone = leave_one_out_centre(T([3.0, 0.0]), torch.tensor([True, False]), 2)
    close(lone, [0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_centre(T([1.0, 2.0, 3.0]), torch.ones(3, dtype=torch.bool), 4)


def test_class_scale_divides_each_class_by_its_own_moving_spread_then_weights_it():
    scale = ClassScale(["harmful", "safe"], decay=0.5, weights={"harmful": 2.0})
    classes = ["harmful", "harmful", "safe", "safe", "safe"]
    centred = torch.tensor([0.1, -0.1, 3.0, -3.0, 0.0])
    scored = torch.tensor([True, True, True, True, False])      # the last row is unscored
    out = scale(centred, classes, scored)
    # batch 1: harmful mean square (0.01 + 0.01) / 2 = 0.01 -> std 0.1, weight 2 -> x 20;
    # safe (9 + 9) / 2 = 9 -> std 3 -> x 1/3; the unscored row is untouched
    assert out.tolist() == pytest.approx([2.0, -2.0, 1.0, -1.0, 0.0])
    # batch 2: harmful (0.04 + 0) / 2 = 0.02 -> v = 0.5 * 0.01 + 0.5 * 0.02 = 0.015 -> std 0.12247
    out = scale(torch.tensor([0.2, 0.0]), ["harmful", "harmful"], torch.tensor([True, True]))
    assert out.tolist() == pytest.approx([2.0 * 0.2 / math.sqrt(0.015), 0.0])
    assert scale.var["safe"] == pytest.approx(9.0)               # no safe rows: unchanged
    # a class whose replies all scored alike is floored at min_std, not blown up
    flat = ClassScale(["safe"], decay=0.9, min_std=0.05)
    assert flat(torch.tensor([1e-4]), ["safe"], torch.tensor([True])).tolist() == pytest.approx([1e-4 / 0.05])
    # weights only
    plain = ClassScale(["harmful", "safe"], decay=0.9, weights={"safe": 0.5}, normalise=False)
    assert plain(torch.tensor([1.0, 4.0]), ["harmful", "safe"], torch.tensor([True, True])).tolist() == [1.0, 2.0]
    restored = ClassScale(["harmful", "safe"], decay=0.5)
    restored.load_state_dict(scale.state_dict())
    assert restored.std("harmful") == pytest.approx(math.sqrt(0.015))


def test_refusal_hold_grows_below_target_shrinks_above_and_stays_within_bounds():
    from pipeline.ppo.math import RefusalHold

    hold = RefusalHold({"harmful": 0.9}, rate=2.0, max_weight=5.0)
    assert hold.weights == {"harmful": 1.0}
    hold.update({"harmful": 1.0}, {"harmful": 3.0})                  # 1 of 3 refused: shortfall 0.9 - 1/3
    assert hold.weights["harmful"] == pytest.approx(math.exp(2.0 * (0.9 - 1 / 3)))
    assert hold.share == {"harmful": pytest.approx(1 / 3)}
    hold.update({}, {"safe": 4.0})                                   # no harmful rollout: unchanged
    assert hold.weights["harmful"] == pytest.approx(math.exp(2.0 * (0.9 - 1 / 3)))
    hold.update({"harmful": 3.0}, {"harmful": 3.0})                  # all refused: back by 2 * 0.1
    assert hold.weights["harmful"] == pytest.approx(math.exp(2.0 * (0.9 - 1 / 3) - 0.2))
    for _ in range(10):
        hold.update({"harmful": 0.0}, {"harmful": 3.0})
    assert hold.weights["harmful"] == pytest.approx(5.0)             # capped at max_weight
    for _ in range(100):
        hold.update({"harmful": 3.0}, {"harmful": 3.0})
    assert hold.weights["harmful"] == pytest.approx(1.0)             # never below 1
    again = RefusalHold({"harmful": 0.9}, rate=2.0, max_weight=5.0)
    hold.update({"harmful": 0.0}, {"harmful": 2.0})
    again.load_state_dict(hold.state_dict())
    assert again.weights == pytest.approx(hold.weights)


def test_step_centres_refusals_found_by_string_match():
    from pipeline import config as config_lib
    from pipeline import ppo
    from pipeline.ppo.rollout import Rollout
    from pipeline.ppo.step import advantages_from_scores

    b, t = 4, 3
    replies = ["I'm sorry, but I can't help with that.", "Sorry, I can't help with that.",
               "Preheat the oven to 200C.", "Use kill -9 with the process id."]
    ro = Rollout(torch.ones(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.long),
                 torch.ones(b, t, dtype=torch.long), torch.ones(b, t, dtype=torch.long),
                 torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, dtype=torch.bool),
                 ["p"] * b, ["harmful", "safe", "safe", "safe"], replies)
    score = [1.0, -2.0, 1.0, 0.0]
    on = config_lib.from_dict(ppo.PPOConfig, {"model": "m", "class_baseline": False, "refusal_centring": 1.0,
                                              "whiten_advantages": False}, "test")
    rec = advantages_from_scores(score, ro, on, kl_coef=0.0)
    close(rec.score, [1.5, -1.5, 0.5, -0.5])
    off = config_lib.from_dict(ppo.PPOConfig, {"model": "m", "class_baseline": False,
                                               "whiten_advantages": False}, "test")
    close(advantages_from_scores(score, ro, off, kl_coef=0.0).score, score)
    with pytest.raises(config_lib.ConfigError, match="refusal_centring"):
        config_lib.from_dict(ppo.PPOConfig, {"model": "m", "refusal_centring": 2.0}, "test")

"""Stage 4, PPO: optimise the SFT policy against the composed reward (RM + RBRM).

Each step draws prompts (in a set class mix when ``class_mix`` is given), samples responses
from the current policy, scores them with the reward composer (:mod:`pipeline.rewards`: the
learned reward model, the rubric grader, or any other source), centres each score on a
baseline (its prompt class's moving average, or its sibling responses' mean), evens out the
classes' spreads when asked, turns the scores into per-token rewards with a KL penalty
towards the frozen starting model, and takes ``ppo_epochs`` passes of clipped PPO updates
over shuffled mini-batches (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019 and
Ouyang et al. 2022).

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

The modules, in the order a step uses them:

    config.py       PPOConfig and CriticFreeConfig on a shared base: every key, its default, its help
    rollout.py      PromptSchedule (which prompts a step draws), rollout() and the Rollout record
    policy.py       the policy with its value head, the reference, response log-probs
    step.py         advantages_from_scores() (pure: scores -> StepRecord) and ppo_update()
    math.py         the formulas: GAE, clipped losses, KL estimators, whitening, baselines
    state.py        TrainerState: what checkpoints save and resumes load
    validation.py   held-out refusal rates and the rule choosing the step to keep
    checkpoint.py   checkpoint folders and the resume checks
    logs.py         history.jsonl, samples.jsonl, ppo_curves.png
    trainer.py      main(): the loop that wires them
    critic_free.py  algo: grpo | rloo through TRL's trainers
    common.py       what PPO and the critic-free path share

Launch::

    python -m pipeline.ppo --config configs/ppo.yaml            # or: rbrm ppo --config ...
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m pipeline.ppo --config configs/ppo.yaml
"""

from __future__ import annotations

from pipeline.ppo.config import CriticFreeConfig, PolicyTrainingConfig, PPOConfig

__all__ = ["CriticFreeConfig", "PolicyTrainingConfig", "PPOConfig", "cli", "main"]


def main(cfg: PolicyTrainingConfig, reward_composer=None) -> dict:
    """Run the stage (see :func:`pipeline.ppo.trainer.main`)."""
    from pipeline.ppo import trainer

    return trainer.main(cfg, reward_composer)


def cli(argv: list[str] | None = None) -> None:
    from pipeline.ppo import trainer

    trainer.cli(argv, description=__doc__)

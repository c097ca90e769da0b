"""The policy-optimisation stage's settings: one dataclass per algorithm.

:class:`PolicyTrainingConfig` holds what every algorithm shares (model, prompts, rewards,
generation, optimiser, logging); :class:`PPOConfig` (``algo: ppo``, ``configs/ppo.yaml``) adds
the critic, GAE, class handling and validation; :class:`CriticFreeConfig` (``algo: grpo`` or
``rloo``, ``configs/grpo.yaml``) adds nothing but its own default group size. A key another
algorithm uses is an error naming it. Names follow TRL's where TRL has the concept
(``max_steps``, ``num_generations``, ``lr_scheduler_type``, ``warmup_steps``, ``save_steps``,
``logging_steps``), so they read as in the SFT and reward-model stages; the older names in
:data:`RENAMED` are still read, with a note.

Every field has its default and a one-line help (``rbrm ppo --help`` lists them, and the reward
sources' and grader's keys). ``validate`` runs after loading and raises a ConfigError naming the
key for anything out of range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import yaml

from pipeline import runs
from pipeline import config as config_lib
from pipeline.config import ConfigError, field
from pipeline.ppo import math as ppo_math
from pipeline.ppo import validation

CRITICS = ("value_head",)
ALGOS = ("ppo", "grpo", "rloo")

DEFAULT_REWARDS = {
    "rm": {"model": "runs/reward_model", "weight": 1.0, "normalise": "running"},
    "rbrm": {"weight": 1.0, "grader": {"backend": "classifier", "rubrics": ["rubrics"]}},
}


# old key -> the key that replaced it (read with a note on stderr)
RENAMED = {"steps": "max_steps", "responses_per_prompt": "num_generations", "lr_schedule": "lr_scheduler_type",
           "lr_warmup_steps": "warmup_steps", "save_every": "save_steps", "log_every": "logging_steps"}
RESUME = ("true", "false", "auto")


@dataclasses.dataclass
class PolicyTrainingConfig:
    """What every algorithm of the stage reads."""

    RENAMED = RENAMED

    model: str = field("runs/sft", help="starting policy (and KL reference): run folder, model folder, short name or hub id")
    prompts: str = field("data/prompts.jsonl", help="prompt set; rows with split: eval are left out")
    fields: dict[str, str] = field({}, help="column renames, ours=theirs (e.g. prompt=question)")
    output_dir: str = field("runs/ppo", help="run folder: config, logs, samples, metrics and the final model/")
    if_exists: str = field("error", help="when output_dir holds a finished run: error | reuse | overwrite")
    algo: str = field("ppo", help="ppo (ours, with a critic) | grpo | rloo (TRL's critic-free trainers on the same "
                                  "rewards); each reads its own keys")
    max_steps: int = field(20, help="optimisation steps; each samples batch_size responses per process, then updates")
    batch_size: int = field(4, help="responses per step, per process (batch_size / num_generations prompts)")
    num_generations: int = field(1, help="responses sampled for each prompt of a step")
    learning_rate: float = field(1e-6, help="AdamW learning rate (LoRA usually wants ~10x more)")
    lr_scheduler_type: str = field("constant", help="constant | linear (anneal the learning rate from learning_rate at "
                                                    "step 1 towards 0 at the last step)")
    warmup_steps: int = field(0, help="raise the learning rate linearly over the first this many steps "
                                      "(Adam's first updates are the largest; see pipeline.ppo.math.scheduled_lr)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this; <= 0 = no clipping")
    max_new_tokens: int = field(48, help="response length limit; a response without eos by then is 'truncated'")
    temperature: float = field(1.0, help="sampling temperature (log-probs use the same one)")
    top_p: float = field(1.0, help="nucleus sampling; < 1 makes sampling differ from the log-probs the loss uses")
    kl_coef: float = field(0.05, help="KL penalty coefficient beta (the initial value when adaptive_kl)")
    clip_range: float = field(0.2, help="policy ratio clip epsilon")
    reward_clip: Optional[float] = field(None, help="clip the composed reward to [-c, c]; null = no clipping")
    bf16: Optional[bool] = field(None, help="bf16 autocast in rollouts and updates (weights and optimizer stay fp32); "
                                            "null = on where the hardware does bf16 fast (AMX CPU, bf16 GPU)")
    lora: bool = field(False, help="train LoRA adapters; the reference is then the policy with adapters off")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA scaling numerator (scale = alpha / r)")
    rewards: dict[str, Any] = field(DEFAULT_REWARDS, help="reward sources, {name: settings}; the source types and "
                                                          "their keys are listed below")
    seed: int = field(42, help="seed for prompt order, sampling and initialisation")
    sample_every: int = field(5, help="append the step's rollouts to samples.jsonl every N steps; 0 = never")
    save_steps: int = field(0, help="every N steps save a resumable checkpoint to checkpoints/step-N; 0 = never")
    report_to: list[str] = field(["tensorboard"], help="trackers (tensorboard, wandb, none); logs go to <run>/logs")
    cache_dir: Optional[str] = field(None, help="model cache for short names (default $RBRM_CACHE_DIR or ./.cache/models)")

    @staticmethod
    def help_epilog() -> str:
        """The nested settings --help lists: reward sources and the rubric grader."""
        from pipeline.config import fields_help
        from pipeline.rbrm.grader import GraderConfig
        from pipeline.rewards import sources_help

        return (f"{sources_help()}\n\nrubric grader (the 'grader' mapping of an rbrm source):\n"
                f"{fields_help(GraderConfig, '    ')}")

    def validate(self) -> None:
        if self.if_exists not in runs.IF_EXISTS:
            raise ConfigError(f"key 'if_exists': expected one of {', '.join(runs.IF_EXISTS)}, got {self.if_exists!r}")
        for name in ("max_steps", "batch_size", "num_generations", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': expected a positive integer, got {getattr(self, name)}")
        for name in ("save_steps", "warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"key '{name}': expected 0 (none) or a positive integer, got {getattr(self, name)}")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"keys 'batch_size' ({self.batch_size}) and 'num_generations' "
                              f"({self.num_generations}): batch_size counts responses, so it must be a multiple "
                              "of num_generations")
        for name in ("learning_rate", "temperature", "clip_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"key '{name}': expected a positive number, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"key 'top_p': expected a number in (0, 1], got {self.top_p}")
        if self.kl_coef < 0:
            raise ConfigError(f"key 'kl_coef': expected a number >= 0, got {self.kl_coef}")
        if self.lr_scheduler_type not in ppo_math.LR_SCHEDULES:
            raise ConfigError(f"key 'lr_scheduler_type': expected one of {', '.join(ppo_math.LR_SCHEDULES)}, "
                              f"got {self.lr_scheduler_type!r}")
        if self.algo not in ALGOS:
            raise ConfigError(f"key 'algo': expected one of {', '.join(ALGOS)}, got {self.algo!r}")
        if not self.rewards:
            raise ConfigError("key 'rewards': expected a non-empty mapping of reward sources")


@dataclasses.dataclass
class PPOConfig(PolicyTrainingConfig):
    """``algo: ppo``: our loop, with a value head."""

    mini_batch_size: int = field(2, help="responses per gradient step; must divide batch_size")
    ppo_epochs: int = field(2, help="passes over each step's responses")
    max_prompt_length: int = field(256, help="longer prompts keep their last tokens")
    adaptive_kl: bool = field(False, help="adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = field(6.0, help="adaptive_kl: target KL per response, in nats")
    kl_horizon: int = field(10000, help="adaptive_kl: horizon in responses")
    kl_estimator: str = field("k1", help="per-token KL estimator in the reward: k1 | k2 | k3")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE lambda")
    clip_range_value: float = field(0.2, help="how far a value may move from its rollout value before clipping")
    vf_coef: float = field(0.1, help="weight of the value loss in the total loss")
    class_baseline: bool = field(True, help="subtract from each score a moving average of its prompt class's scores "
                                            "(pipeline.ppo.math.ClassBaseline); used when num_generations is 1 (above "
                                            "1 each score is centred on its sibling responses' mean instead)")
    class_baseline_decay: float = field(0.9, help="class_baseline, class_scale: weight of the old average at each step")
    class_mix: dict[str, float] = field({}, help="share of each step's prompts per class, e.g. harmful=0.4,safe=0.4,"
                                                 "sensitive=0.2 (normalised; a class left out is not drawn); "
                                                 "empty = the data's own mix")
    class_scale: bool = field(False, help="divide each class's centred scores by a moving average of that class's "
                                          "spread, so every class carries the same weight of the update whatever its "
                                          "rubric's reward range (pipeline.ppo.math.ClassScale)")
    class_weights: dict[str, float] = field({}, help="multiply each class's centred scores, e.g. harmful=1.5 "
                                                     "(after class_scale when on); a class left out weighs 1")
    refusal_centring: float = field(0.0, help="after the baseline and class scaling, take this share (0-1) of the "
                                              "mean score of the step's refusals (string match) out of each refusal, "
                                              "and of the other replies' mean out of each of them: the update then "
                                              "moves which prompts are refused more than how many "
                                              "(pipeline.ppo.math.refusal_centre); 0 = off")
    hold_refusal: dict[str, float] = field({}, help="class -> share of its rollouts that should refuse (string match), "
                                                    "e.g. harmful=0.9: below it the class's weight grows, a Lagrange "
                                                    "multiplier (pipeline.ppo.math.RefusalHold), and shrinks back to 1 "
                                                    "above it; empty = off")
    hold_rate: float = field(2.0, help="hold_refusal: the multiplier's step in log space per unit of shortfall")
    hold_max_weight: float = field(5.0, help="hold_refusal: the largest the multiplier grows")
    whiten_advantages: bool = field(True, help="whiten advantages over each step's real tokens")
    critic: str = field("value_head", help="value function: value_head (a linear head on the policy's last hidden state)")
    logging_steps: int = field(1, help="send metrics to the trackers every N steps")
    keep_checkpoints: int = field(2, help="how many of the newest checkpoints to keep; older ones are deleted")
    resume: str = field("false", help="true: continue from the newest checkpoint in output_dir (error if there is "
                                      "none); auto: continue if there is one, else start; false: start from step 0")
    val_fraction: float = field(0.0, help="share of each prompt class's training prompts held out for validation "
                                          "(seeded by seed); 0 = train on all")
    val_prompts: str = field("", help="a prompt file validated on instead of a held-out share of the training prompts "
                                      "(its rows but split: eval; written apart from them, as an eval set is); empty = "
                                      "val_fraction")
    val_every: int = field(0, help="every N steps (and at step 0 and the last step) decode the held-out prompts greedily "
                                   "and log refusal rates by string match to validation.jsonl; 0 = never")
    val_max_new_tokens: int = field(16, help="validation reply length; a refusal shows in its opening words")
    val_batch_size: int = field(64, help="validation prompts decoded together")
    select: str = field("last", help="which policy becomes model/: last | f1 (the validated step with the best "
                                     "harmonic mean of harmful prompts refused and safe prompts answered) | best "
                                     "(the validated step that refuses the most harmful prompts while refusing at "
                                     "most max_over_refusal of safe ones)")
    max_over_refusal: float = field(0.05, help="select: best: the over-refusal budget, a share of safe validation prompts")
    select_window: int = field(1, help="select: f1: score a validated step by the mean F1 of its last N checks (itself "
                                       "and the N-1 before it), so one lucky check does not decide; 1 = its own F1")
    weight_average: float = field(0.0, help="decay of an exponential moving average of the policy's weights, updated "
                                            "after every step; validation, selection and model/ use the average "
                                            "while rollouts sample from the live weights (e.g. 0.9: about the last "
                                            "10 steps); 0 = off")
    keep_validated: bool = field(False, help="also save every validated policy to validated/step-N (~0.5 GB each for "
                                             "SmolLM2-135M), to evaluate the step another selection rule would keep")
    ptx_coef: float = field(0.0, help="weight of the demonstrations' negative log-likelihood added to each update "
                                      "(PPO-ptx): holds what SFT taught where rollouts carry no signal; 0 = off")
    ptx_data: str = field("", help="ptx_coef > 0: the SFT demonstrations (same formats as rbrm sft's data)")
    ptx_classes: list[str] = field([], help="ptx: only the demonstrations whose prompt_class is listed, e.g. [harmful]: "
                                            "an anchor on the refusals that rollouts stop rewarding once every "
                                            "reply refuses; empty = every demonstration")
    ptx_batch_size: int = field(4, help="demonstrations per update mini-batch, per process")
    ptx_max_length: int = field(128, help="demonstration replies keep their first this many tokens")

    def validate(self) -> None:
        super().validate()
        if self.algo != "ppo":
            raise ConfigError(f"key 'algo': PPOConfig is for algo ppo, got {self.algo!r}")
        for name in ("mini_batch_size", "ppo_epochs", "max_prompt_length", "logging_steps", "kl_horizon",
                     "val_max_new_tokens", "val_batch_size", "keep_checkpoints", "ptx_batch_size", "ptx_max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': expected a positive integer, got {getattr(self, name)}")
        if not 0 <= self.refusal_centring <= 1:
            raise ConfigError(f"key 'refusal_centring': expected a number in [0, 1], got {self.refusal_centring}")
        if not 0 <= self.class_baseline_decay < 1:
            raise ConfigError(f"key 'class_baseline_decay': expected a number in [0, 1), got {self.class_baseline_decay}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"key 'val_fraction': expected a share in [0, 1), got {self.val_fraction}")
        if self.val_every < 0:
            raise ConfigError(f"key 'val_every': expected 0 (never) or a positive integer, got {self.val_every}")
        if self.val_fraction and self.val_prompts:
            raise ConfigError("keys 'val_fraction' and 'val_prompts': validation reads one of them; set the other to "
                              "0 / empty")
        if self.val_every and not (self.val_fraction or self.val_prompts):
            raise ConfigError("key 'val_every': validation needs held-out prompts; set val_fraction (e.g. 0.2) "
                              "or val_prompts")
        if self.select_window < 1:
            raise ConfigError(f"key 'select_window': expected a positive integer, got {self.select_window}")
        if self.select not in validation.SELECT:
            raise ConfigError(f"key 'select': expected one of {', '.join(validation.SELECT)}, got {self.select!r}")
        if self.select != "last" and not self.val_every:
            raise ConfigError(f"key 'select': {self.select} chooses among validated steps; set val_every and "
                              "val_fraction or val_prompts")
        for name in ("class_mix", "class_weights"):
            bad = {k: v for k, v in getattr(self, name).items() if not (v >= 0 and math.isfinite(v))}
            if bad:
                raise ConfigError(f"key '{name}': expected shares/weights >= 0, got {bad}")
        bad = {k: v for k, v in self.hold_refusal.items() if not 0 <= v <= 1}
        if bad:
            raise ConfigError(f"key 'hold_refusal': expected shares in [0, 1], got {bad}")
        if not (self.hold_rate > 0 and math.isfinite(self.hold_rate)):
            raise ConfigError(f"key 'hold_rate': expected a positive number, got {self.hold_rate}")
        if not (self.hold_max_weight >= 1 and math.isfinite(self.hold_max_weight)):
            raise ConfigError(f"key 'hold_max_weight': expected a number >= 1, got {self.hold_max_weight}")
        if self.class_mix and not sum(self.class_mix.values()) > 0:
            raise ConfigError(f"key 'class_mix': at least one class needs a share above 0, got {self.class_mix}")
        if not 0 <= self.max_over_refusal <= 1:
            raise ConfigError(f"key 'max_over_refusal': expected a share in [0, 1], got {self.max_over_refusal}")
        self.resume = str(self.resume).strip().lower()
        if self.resume not in RESUME:
            raise ConfigError(f"key 'resume': expected true, false or auto, got {self.resume!r}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"keys 'batch_size' ({self.batch_size}) and 'mini_batch_size' ({self.mini_batch_size}): "
                              "mini_batch_size must divide batch_size")
        for name in ("clip_range_value", "kl_target"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"key '{name}': expected a positive number, got {getattr(self, name)}")
        if self.kl_estimator not in ppo_math.KL_ESTIMATORS:
            raise ConfigError(f"key 'kl_estimator': expected one of {', '.join(ppo_math.KL_ESTIMATORS)}, "
                              f"got {self.kl_estimator!r}")
        if not (self.ptx_coef >= 0 and math.isfinite(self.ptx_coef)):
            raise ConfigError(f"key 'ptx_coef': expected a number >= 0, got {self.ptx_coef}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("key 'ptx_data': ptx_coef > 0 needs demonstrations (e.g. data/sft.jsonl)")
        if self.critic not in CRITICS:
            raise ConfigError(f"key 'critic': expected one of {', '.join(CRITICS)}, got {self.critic!r}")
        if not 0 <= self.weight_average < 1:
            raise ConfigError(f"key 'weight_average': expected a decay in [0, 1) (0 = off), got {self.weight_average}")


@dataclasses.dataclass
class CriticFreeConfig(PolicyTrainingConfig):
    """``algo: grpo`` or ``rloo``: TRL's GRPOTrainer / RLOOTrainer on the same rewards; no critic,
    one gradient step per sampled batch, the baseline from each prompt's group of responses."""

    algo: str = field("grpo", help="grpo | rloo (TRL's critic-free trainers); ppo reads PPOConfig's keys")
    num_generations: int = field(4, help="responses sampled per prompt (the group a baseline is taken over)")

    def validate(self) -> None:
        super().validate()
        if self.algo == "ppo":
            raise ConfigError("key 'algo': CriticFreeConfig is for grpo or rloo, got 'ppo'")
        if self.num_generations < 2:
            raise ConfigError(f"key 'num_generations': {self.algo} needs at least 2 responses per prompt, "
                              f"got {self.num_generations}")


def config_class(algo: str) -> type[PolicyTrainingConfig]:
    """The settings class of ``algo`` (PPOConfig for an unknown one, whose check then names it)."""
    return CriticFreeConfig if algo in ("grpo", "rloo") else PPOConfig


def from_dict(data: dict[str, Any], source: str = "<dict>", overrides: Optional[dict[str, Any]] = None):
    """The stage's settings from a mapping and command-line overrides, in the class ``algo`` picks."""
    algo = str((overrides or {}).get("algo") or data.get("algo") or "ppo")
    return config_lib.from_dict(config_class(algo), data, source, overrides)

"""`rbrm`: one front door to every stage.

    rbrm demo [--seeds 42,43,44]    the whole pipeline on the embedded default (SFT -> RM -> PPO -> evaluation)
    rbrm fetch smollm2-135m-instruct
    rbrm sft --config configs/sft.yaml [--field value ...]
    rbrm reward-model --config configs/reward_model.yaml [--field value ...]
    rbrm reward-model accuracy --model runs/reward_model --data FILE
    rbrm ppo --config configs/ppo.yaml [--field value ...]      (configs/grpo.yaml: GRPO / RLOO)
    rbrm rubrics check rubrics/*.yaml
    rbrm fit-weights --config configs/fit_weights.yaml           (category rewards fitted for PPO's rbrm source)
    rbrm evaluate --config configs/evaluate.yaml [--field value ...]
    rbrm evaluate compare runs/eval-before runs/eval-after

Each subcommand's --help lists its settings. For several processes use accelerate directly:
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m pipeline.sft --config configs/sft.yaml
"""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("pipeline.demo", "cli", "run the embedded-default pipeline end to end (reuses finished stages)"),
    "fetch": ("pipeline.models", "main", "provision a known model into the cache (also: models tiny/list)"),
    "models": ("pipeline.models", "main", "model cache tools: fetch, tiny, list"),
    "sft": ("pipeline.sft", "cli", "stage 1: supervised fine-tuning on demonstrations"),
    "reward-model": ("pipeline.reward_model", "cli", "stage 2: Bradley-Terry reward model on preference pairs"),
    "ppo": ("pipeline.ppo", "cli", "stage 4: PPO with RM + RBRM rewards"),
    "evaluate": ("pipeline.evaluate", "cli", "stage 5: refusal rates per prompt class (also: evaluate compare A B)"),
    "fit-weights": ("pipeline.rbrm.weights", "cli", "fit the rubric category rewards so the total PPO reward ranks "
                    "completions in the rubrics' order"),
    "rubrics": ("pipeline.rubrics", "main", "rubric tools: check (validate), render (show the grader input), eval (grader vs human labels)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (_, _, help_text) in COMMANDS.items():
            print(f"  {name:<14} {help_text}")
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func, _ = COMMANDS[name]
    if name == "fetch":
        rest = ["fetch", *rest]
    import importlib

    getattr(importlib.import_module(module_name), func)(rest)


if __name__ == "__main__":
    main()

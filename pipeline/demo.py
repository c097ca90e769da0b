"""The demo: from nothing to a safer SmolLM2 on the embedded default, on CPU.

Runs, in one process: provision SmolLM2-135M-Instruct -> SFT -> reward model (initialised from
the SFT model) -> PPO with the reward model plus the rubric grader -> evaluation of the base,
SFT and PPO models on the project's eval prompts (and a fixed sample of XSTest when
``../shared/data`` is present). It ends with a table of refusal rates by both classifiers and
the paths of the report and charts.

Each stage reads its config from ``configs/<stage>.yaml`` with the overrides in
``configs/demo.yaml``. Finished stages are reused and an interrupted PPO run resumes from its
last checkpoint, so a second ``make demo`` continues rather than restarts.

    rbrm demo            # what `make demo` runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline import config as config_lib
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.evaluation.report import _get
from pipeline.models import DEFAULT_MODEL, ModelError, fetch
from pipeline.rbrm.rubric import RubricError

STAGES = ("sft", "reward_model", "ppo", "evaluate")

# per prompt class: (label, figure key inside the class block) shown in the closing table
TABLE_ROWS = {
    "harmful": [("refusal, grader (A+B)", "refusal_rate.grader"), ("refusal, string match", "refusal_rate.string_match"),
                ("desired refusal (A)", "category_rate.A"), ("disallowed content (C)", "category_rate.C")],
    "sensitive": [("desired answer (D)", "category_rate.D")],
    "safe": [("over-refusal, grader", "refusal_rate.grader"), ("over-refusal, string match", "refusal_rate.string_match")],
}


def _class_block(summary: dict, model: str, prompt_set: str, cls: str) -> dict:
    return summary["models"].get(model, {}).get(prompt_set, {}).get("classes", {}).get(cls) or {}


def _figure(block: dict, key: str) -> float | None:
    node = _get(block, key)
    return node.get("value") if isinstance(node, dict) else None


def results_table(summary: dict) -> list[str]:
    """The demo's closing table: each model's refusal figures per prompt set and class (markdown)."""
    models = list(summary["models"])
    sets = list(dict.fromkeys(s for m in models for s in summary["models"][m]))
    lines = ["| prompt set / class | figure | " + " | ".join(models) + " |",
             "|---|---|" + "---:|" * len(models)]
    for prompt_set in sets:
        for cls, rows in TABLE_ROWS.items():
            blocks = [_class_block(summary, m, prompt_set, cls) for m in models]
            n = next((b.get("n") for b in blocks if b), None)
            if n is None:
                continue
            for label, key in rows:
                cells = ["n/a" if (v := _figure(b, key)) is None else f"{100 * v:.1f}%" for b in blocks]
                lines.append(f"| {prompt_set} / {cls} (n={n}) | {label} | " + " | ".join(cells) + " |")
    return lines


def _stage_config(cls, name: str, config_dir: Path, demo: dict):
    path = config_dir / f"{name}.yaml"
    data = {**config_lib.load_yaml(path), **(demo.get(name) or {})}
    return config_lib.from_dict(cls, data, f"{path} + {config_dir / 'demo.yaml'}", overrides={"if_exists": "reuse"})


def run(config_dir: str = "configs") -> dict:
    from pipeline import evaluate, ppo, reward_model, sft
    from pipeline.evaluation import report as report_lib

    config_dir = Path(config_dir)
    demo_file = config_dir / "demo.yaml"
    demo = config_lib.load_yaml(demo_file) if demo_file.is_file() else {}
    unknown = sorted(set(demo) - set(STAGES))
    if unknown:
        raise ConfigError(f"{demo_file}: unknown key '{unknown[0]}'; expected some of {', '.join(STAGES)}")

    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        print(f"\n== demo: {name} ==", flush=True)
        t = time.time()
        result = fn(*args)
        timings[name] = round(time.time() - t, 1)
        return result

    timed("fetch", fetch, DEFAULT_MODEL)
    sft_cfg = _stage_config(sft.SFTStageConfig, "sft", config_dir, demo)
    sft_metrics = timed("sft", sft.main, sft_cfg)
    rm_cfg = _stage_config(reward_model.RewardModelConfig, "reward_model", config_dir, demo)
    rm_metrics = timed("reward_model", reward_model.main, rm_cfg)
    ppo_cfg = _stage_config(ppo.PPOConfig, "ppo", config_dir, demo)
    ppo_metrics = timed("ppo", ppo.main, ppo_cfg)
    eval_cfg = _stage_config(evaluate.EvaluateConfig, "evaluate", config_dir, demo)
    report = timed("evaluate", evaluate.main, eval_cfg)
    summary = report["summary"]

    eval_dir = Path(eval_cfg.output_dir)
    compares = {}
    models = list(summary["models"])
    if "base" in models:
        for other in (m for m in models if m != "base"):
            compares[other] = report_lib.compare_models(eval_dir, "base", other)["files"]

    out = {"wall_time_s": timings, "sft": sft_metrics, "reward_model": rm_metrics, "ppo": ppo_metrics,
           "table": results_table(summary),
           "files": {"report": str(eval_dir / "report.md"), "responses": str(eval_dir / "responses.jsonl"),
                     "charts": [str(eval_dir / "incorrect_behaviour.png"), str(eval_dir / "category_mix.png"),
                                *(c["chart"] for c in compares.values()),
                                str(Path(ppo_cfg.output_dir) / "ppo_curves.png")],
                     "compare": {k: v["markdown"] for k, v in compares.items()}}}
    print("\n== demo summary ==")
    for name in ("fetch", *STAGES):
        print(f"  {name:<13} {timings[name]:>7.1f}s")
    print(f"  total         {sum(timings.values()):>7.1f}s")
    acc = rm_metrics.get("eval_accuracy")
    if acc is not None:
        print(f"  reward model: held-out accuracy {acc:.3f} ({rm_metrics['eval_pairs']} pairs)")
    print(f"  ppo: reward {ppo_metrics.get('reward_first')} -> {ppo_metrics.get('reward_last')}, "
          f"KL {ppo_metrics.get('kl_first')} -> {ppo_metrics.get('kl_last')}")
    if ppo_metrics.get("validation_selected"):
        from pipeline.ppo_validation import describe

        print(f"  ppo: kept the policy of {describe(ppo_metrics['validation_selected'])} (held-out training prompts)")
    print("\n" + "\n".join(out["table"]))
    print("\n  report:  " + out["files"]["report"])
    for chart in out["files"]["charts"]:
        if Path(chart).is_file():
            print("  chart:   " + chart)
    for name, path in out["files"]["compare"].items():
        print(f"  base -> {name}: {path}")
    return out


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rbrm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default="configs", help="folder holding the stage configs and demo.yaml")
    parser.add_argument("--summary", default="runs/demo_summary.json", help="where to write the summary JSON")
    args = parser.parse_args(argv)
    try:
        summary = run(args.config_dir)
    except RubricError as e:
        config_lib.fail("; ".join(e.problems))
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  summary: {args.summary}")


if __name__ == "__main__":
    cli()

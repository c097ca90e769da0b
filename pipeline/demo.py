"""The demo: from nothing to a trained SFT model and reward model on the embedded default.

Runs, in one process: provision SmolLM2-135M-Instruct -> SFT (``configs/sft.yaml``) ->
reward model (``configs/reward_model.yaml``, initialised from the SFT model), then prints
what each stage produced and how long it took. Finished stages are reused, so a second
``make demo`` returns quickly; an interrupted one picks up at the unfinished stage.

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
from pipeline.models import DEFAULT_MODEL, ModelError, fetch


def run(config_dir: str = "configs") -> dict:
    from pipeline import reward_model, sft

    timings: dict[str, float] = {}
    t = time.time()
    fetch(DEFAULT_MODEL)
    timings["fetch"] = round(time.time() - t, 1)

    def stage_config(cls, name: str):
        path = Path(config_dir) / f"{name}.yaml"
        return config_lib.from_dict(cls, config_lib.load_yaml(path), str(path), overrides={"if_exists": "reuse"})

    t = time.time()
    sft_cfg = stage_config(sft.SFTStageConfig, "sft")
    sft_metrics = sft.main(sft_cfg)
    timings["sft"] = round(time.time() - t, 1)

    t = time.time()
    rm_cfg = stage_config(reward_model.RewardModelConfig, "reward_model")
    rm_metrics = reward_model.main(rm_cfg)
    timings["reward_model"] = round(time.time() - t, 1)

    summary = {"wall_time_s": timings, "sft": sft_metrics, "reward_model": rm_metrics,
               "models": {"sft": str(Path(sft_cfg.output_dir) / "model"),
                          "reward_model": str(Path(rm_cfg.output_dir) / "model")}}
    print("\n== demo summary ==")
    print(f"  fetch         {timings['fetch']:>7.1f}s")
    print(f"  sft           {timings['sft']:>7.1f}s   train loss {sft_metrics['train_loss']:.3f}"
          f"  -> {summary['models']['sft']}")
    acc = rm_metrics.get("eval_accuracy")
    acc_text = f"held-out accuracy {acc:.3f} ({rm_metrics['eval_pairs']} pairs)" if acc is not None else ""
    print(f"  reward model  {timings['reward_model']:>7.1f}s   {acc_text}  -> {summary['models']['reward_model']}")
    return summary


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rbrm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default="configs", help="folder holding sft.yaml and reward_model.yaml")
    parser.add_argument("--summary", default="runs/demo_summary.json", help="where to write the summary JSON")
    args = parser.parse_args(argv)
    try:
        summary = run(args.config_dir)
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  summary: {args.summary}")


if __name__ == "__main__":
    cli()

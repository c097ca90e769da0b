"""Stage 2, reward model: a Bradley-Terry scorer trained on preference pairs.

Trains a one-output sequence classifier on (prompt, chosen, rejected) with TRL's
RewardTrainer (loss ``-log sigmoid(r_chosen - r_rejected)``), starting from the SFT model
as in InstructGPT. Full fine-tuning or LoRA (the score head always trains). After training
it measures pairwise accuracy on the held-out pairs (rows with ``split: eval``, else a
seeded ``eval_fraction``) and writes it to ``metrics.json``.

``RewardScorer`` loads a saved reward-model folder and scores (prompt, response) batches;
the PPO stage uses it as one reward source.

Launch::

    accelerate launch -m pipeline.reward_model --config configs/reward_model.yaml
    python -m pipeline.reward_model --config configs/reward_model.yaml       # or: rbrm reward-model ...
    python -m pipeline.reward_model accuracy --model runs/reward_model \\
        --data ../shared/data/hh_rlhf_harmless_base_test.jsonl                # held-out accuracy on any pair set
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline import config as config_lib
from pipeline import runs
from pipeline.config import ConfigError, field
from pipeline.data import DataError
from pipeline.models import ModelError
from pipeline.training import Timer, TrainStageConfig, lora_config, process_state, save_final_model, trainer_kwargs

STAGE = "reward_model"


@dataclasses.dataclass
class RewardModelConfig(TrainStageConfig):
    data: str = field("data/preferences.jsonl", help="pairs: rows with 'prompt', 'chosen', 'rejected' (and optional 'split')")
    eval_data: str = field("", help="held-out pairs; empty = rows with split 'eval', else eval_fraction of data")
    eval_fraction: float = field(0.2, help="share of pairs held out when the data marks no eval split")
    output_dir: str = field("runs/reward_model", help="run folder: config, logs, metrics and the final model/ go here")
    learning_rate: float = field(1e-5, help="peak learning rate (LoRA usually wants ~10x more)")
    center_rewards_coefficient: float = field(0.01, help="penalty on mean squared reward, keeps scores near 0")
    eval_batch_size: int = field(16, help="pairs per batch when measuring accuracy")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"key 'eval_fraction': expected a number in [0, 1), got {self.eval_fraction}")


def _messages(prompt: str | list[dict], response: str) -> list[dict]:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return turns + [{"role": "assistant", "content": response}]


class RewardScorer:
    """Scores (prompt, response) pairs with a saved reward model, in length-sorted batches.

    A prompt is a string (one user turn) or a list of chat messages. Sequences longer than
    ``max_length`` keep their last tokens, so the response end is always scored.
    """

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 512, device: str | None = None,
                 dtype=None, cache_dir: str | None = None):
        import torch

        from pipeline.models import load_sequence_classifier, load_tokenizer, resolve_model

        path = resolve_model(model, cache_dir)
        self.tokenizer = load_tokenizer(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_sequence_classifier(path, self.tokenizer, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompt: str | list[dict], response: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(_messages(prompt, response), tokenize=True, return_dict=True)["input_ids"]
        return ids[-self.max_length:]

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str], progress: bool = False):
        """-> (N,) float tensor on the CPU: one scalar reward per (prompt, response)."""
        import torch
        from tqdm.auto import tqdm

        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = torch.empty(len(encoded))
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), self.batch_size), desc="scoring", unit="batch",
                              disable=not progress):
                idx = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T) right-padded
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T) 1 = real token
                for row, i in enumerate(idx):
                    input_ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                    attention_mask[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits  # (B, 1)
                scores[idx] = logits[:, 0].float().cpu()
        return scores


def pairwise_accuracy(scorer: RewardScorer, pairs, progress: bool = False) -> dict:
    """Share of pairs whose chosen response outscores the rejected one, plus the mean margin."""
    prompts = list(pairs["prompt"])
    chosen = [c[0]["content"] for c in pairs["chosen"]]
    rejected = [r[0]["content"] for r in pairs["rejected"]]
    s_chosen = scorer.score(prompts, chosen, progress)
    s_rejected = scorer.score(prompts, rejected, progress)
    margin = s_chosen - s_rejected
    return {
        "accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
        "pairs": len(prompts),
    }


def build_trainer(cfg: RewardModelConfig, train_ds, eval_ds=None):
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from pipeline.models import load_sequence_classifier, load_tokenizer, resolve_model

    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(path)
    # The score head of a causal LM starts random, and the Trainer seeds only after the model
    # exists: without this, two runs of this stage on their own got different heads and held-out
    # accuracies (0.92 to 1.00 on the demo's pairs), while the demo (one process) repeated itself.
    set_seed(cfg.seed)
    model = load_sequence_classifier(path, tokenizer)
    args = RewardConfig(
        **trainer_kwargs(cfg),
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        eval_strategy="no",
    )
    train_ds = train_ds.select_columns(["prompt", "chosen", "rejected"])
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, "SEQ_CLS"),
    )
    return trainer, tokenizer


def main(cfg: RewardModelConfig) -> dict:
    """Train, save and measure held-out accuracy; returns the metrics (also in ``metrics.json``)."""
    from pipeline.data import load_preferences, split_dataset

    state = process_state()
    timer = Timer()
    reused = runs.start(cfg.output_dir, STAGE, cfg, cfg.if_exists, state.is_main_process, state.wait_for_everyone)
    if reused is not None:
        return reused
    pairs = load_preferences(cfg.data, cfg.fields)
    if cfg.eval_data:
        train_ds, eval_ds = pairs, load_preferences(cfg.eval_data, cfg.fields)
    else:
        train_ds, eval_ds = split_dataset(pairs, cfg.eval_fraction, cfg.seed)
    trainer, tokenizer = build_trainer(cfg, train_ds)
    result = trainer.train()
    final = save_final_model(trainer, tokenizer, cfg)
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_pairs": len(train_ds),
        "world_size": state.num_processes,
    }
    if state.is_main_process:
        if eval_ds is not None and len(eval_ds):
            scorer = RewardScorer(str(final), batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
            held_out = pairwise_accuracy(scorer, eval_ds)
            metrics.update({f"eval_{k}": v for k, v in held_out.items()})
        metrics["wall_time_s"] = timer.seconds
        runs.finish(cfg.output_dir, STAGE, final, metrics)
        acc = f", held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['eval_pairs']} pairs" \
            if "eval_accuracy" in metrics else ""
        print(f"reward_model: done in {metrics['wall_time_s']}s{acc}; model in {final}", file=sys.stderr)
    state.wait_for_everyone()
    return metrics


def accuracy_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rbrm reward-model accuracy",
        description="Pairwise accuracy of a saved reward model on a preference set (any JSONL with "
                    "prompt/chosen/rejected, e.g. ../shared/data/hh_rlhf_harmless_base_test.jsonl).")
    parser.add_argument("--model", required=True, help="reward-model folder or run folder")
    parser.add_argument("--data", required=True, help="preference pairs (.jsonl/.json/.parquet or hub name)")
    parser.add_argument("--fields", default="", help="column renames, ours=theirs,... (e.g. chosen=good)")
    parser.add_argument("--split", default="", help="only rows whose 'split' equals this (e.g. eval)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0 = all)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--output", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        fields = config_lib.coerce(args.fields, dict[str, str], "--fields")
        pairs = load_pairs_for_eval(args.data, fields, args.split, args.limit)
        scorer = RewardScorer(args.model, batch_size=args.batch_size, max_length=args.max_length)
        result = {"data": args.data, "model": args.model, **pairwise_accuracy(scorer, pairs, progress=True)}
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


def load_pairs_for_eval(source: str, fields: dict, split: str = "", limit: int = 0):
    from pipeline.data import load_preferences

    pairs = load_preferences(source, fields, skip_invalid=True)
    if split:
        pairs = pairs.filter(lambda r: r["split"] == split)
    if limit > 0:
        pairs = pairs.select(range(min(limit, len(pairs))))
    return pairs


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "accuracy":
        return accuracy_cli(argv[1:])
    cfg = config_lib.parse(RewardModelConfig, argv, prog="rbrm reward-model", description=__doc__)
    try:
        main(cfg)
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))


if __name__ == "__main__":
    cli()

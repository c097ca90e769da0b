"""Stage 1, SFT: supervised fine-tuning of a chat model on demonstrations.

Trains on conversations (``data/sft.jsonl`` by default) that include ideal refusals for
harmful requests, with TRL's SFTTrainer. The loss covers assistant tokens only: the chat
template marks assistant turns with ``{% generation %}`` and TRL masks everything else.
Full fine-tuning or LoRA (``lora: true``; adapters merged into the saved model unless
``merge_lora: false``).

Departures from the textbook recipe: small CPU-friendly defaults (two passes over the
demonstrations in batches of 4 in configs/sft.yaml), no gradient checkpointing, bf16
autocast where the CPU has AMX, and the final model is written to ``<output_dir>/model``
in one rename so an interrupted run leaves no folder that looks finished.

Launch::

    accelerate launch -m pipeline.sft --config configs/sft.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m pipeline.sft --config configs/sft.yaml
    python -m pipeline.sft --config configs/sft.yaml --max_steps 10      # or: rbrm sft ...
"""

from __future__ import annotations

import dataclasses
import sys

from pipeline import config as config_lib
from pipeline import runs
from pipeline.config import ConfigError, field
from pipeline.data import DataError
from pipeline.models import CHATML_TRAINING_TEMPLATE, ModelError
from pipeline.training import Timer, TrainStageConfig, lora_config, process_state, save_final_model, trainer_kwargs

STAGE = "sft"


@dataclasses.dataclass
class SFTStageConfig(TrainStageConfig):
    data: str = field("data/sft.jsonl", help="conversations: rows with 'messages' (or 'prompt' + 'response')")
    eval_data: str = field("", help="optional held-out conversations; eval loss is reported when set")
    output_dir: str = field("runs/sft", help="run folder: config, logs, metrics and the final model/ go here")
    assistant_only_loss: bool = field(True, help="put the loss on assistant tokens only")


def ensure_training_template(tokenizer) -> None:
    """Make sure the chat template marks assistant turns for ``assistant_only_loss``.

    TRL patches the templates it knows; SmolLM2's ChatML is not among them, so ChatML
    templates without markers get ours (same rendered text, with the markers).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template or ""
    if has_generation_markers(template):
        return
    try:
        patched = get_training_chat_template(tokenizer)
    except (ValueError, NotImplementedError):
        patched = None
    if patched:
        tokenizer.chat_template = patched
    elif "<|im_start|>" in template:
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    else:
        raise ConfigError(
            "key 'assistant_only_loss': the model's chat template has no {% generation %} markers and no "
            "known training version; set assistant_only_loss: false or use a template with the markers")


def build_trainer(cfg: SFTStageConfig, train_ds, eval_ds=None):
    """Model, tokenizer and an SFTTrainer wired from ``cfg`` (separate so tests can inspect it)."""
    from trl import SFTConfig, SFTTrainer

    from pipeline.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(path)
    if cfg.assistant_only_loss:
        ensure_training_template(tokenizer)
    model = load_causal_lm(path, tokenizer)
    args = SFTConfig(
        **trainer_kwargs(cfg),
        assistant_only_loss=cfg.assistant_only_loss,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=max(cfg.logging_steps, 1) * 4,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, "CAUSAL_LM"),
    )
    return trainer, tokenizer


def main(cfg: SFTStageConfig) -> dict:
    """Train and save; returns the run's metrics (also written to ``metrics.json``)."""
    from pipeline.data import load_sft

    state = process_state()
    timer = Timer()
    reused = runs.start(cfg.output_dir, STAGE, cfg, cfg.if_exists, state.is_main_process, state.wait_for_everyone)
    if reused is not None:
        return reused
    train_ds = load_sft(cfg.data, cfg.fields)
    eval_ds = load_sft(cfg.eval_data, cfg.fields) if cfg.eval_data else None
    trainer, tokenizer = build_trainer(cfg, train_ds, eval_ds)
    result = trainer.train()
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_examples": len(train_ds),
        "world_size": state.num_processes,
    }
    if eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    final = save_final_model(trainer, tokenizer, cfg)
    metrics["wall_time_s"] = timer.seconds
    if state.is_main_process:
        runs.finish(cfg.output_dir, STAGE, final, metrics)
        print(f"sft: done in {metrics['wall_time_s']}s, train loss {metrics['train_loss']:.4f}; model in {final}",
              file=sys.stderr)
    return metrics


def cli(argv: list[str] | None = None) -> None:
    cfg = config_lib.parse(SFTStageConfig, argv, prog="rbrm sft", description=__doc__)
    try:
        main(cfg)
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))


if __name__ == "__main__":
    cli()

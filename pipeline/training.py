"""Settings and helpers shared by the trainer-based stages (SFT and the reward model).

Both stages wrap a TRL trainer. What they share lives here: the common config fields, the
translation of those fields into TRL's config, LoRA, precision, and saving the final model
into the run folder so that it appears all at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import runs
from pipeline.config import ConfigError, field


@dataclasses.dataclass
class TrainStageConfig:
    """Fields every trainer-based stage has."""

    model: str = field("smollm2-135m-instruct", help="short name, local folder (or run folder) or hub id of the starting model")
    data: str = field("", help="training data: .jsonl/.json/.parquet path or hub dataset name")
    fields: dict[str, str] = field({}, help="column renames, ours=theirs (e.g. prompt=question)")
    output_dir: str = field("runs/stage", help="run folder: config, logs, metrics and the final model/ go here")
    if_exists: str = field("error", help="when output_dir holds a finished run: error | reuse | overwrite")
    max_steps: int = field(60, help="optimizer steps; <= 0 means train for num_train_epochs")
    num_train_epochs: float = field(1.0, help="epochs, used only when max_steps <= 0")
    per_device_train_batch_size: int = field(4, help="examples per process per micro-batch")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    learning_rate: float = field(2e-5, help="peak learning rate (LoRA usually wants ~10x more)")
    lr_scheduler_type: str = field("cosine", help="transformers scheduler name (linear, cosine, constant, ...)")
    warmup_steps: float = field(0.05, help="warm-up: steps, or a fraction of training when < 1")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_length: int = field(512, help="tokens per sequence; longer ones are truncated (SFT) or dropped (RM)")
    lora: bool = field(False, help="train LoRA adapters instead of all weights")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = field(0.05, help="dropout on the LoRA branch")
    lora_target_modules: list[str] = field(["all-linear"], help="modules that get adapters ('all-linear' or names)")
    merge_lora: bool = field(True, help="merge adapters into the weights when saving (a plain HF model folder)")
    bf16: Optional[bool] = field(None, help="bf16 autocast; null = on where the hardware does bf16 fast")
    gradient_checkpointing: bool = field(False, help="trade compute for memory (off: small models on CPU)")
    logging_steps: int = field(5, help="log loss and metrics every N steps")
    save_steps: int = field(0, help="write a checkpoint every N steps; 0 = only the final model")
    seed: int = field(42, help="seed for data order and initialisation")
    report_to: list[str] = field(["tensorboard"], help="trackers for accelerate/transformers (tensorboard, wandb, none)")
    cache_dir: Optional[str] = field(None, help="model cache for short names (default $RBRM_CACHE_DIR or ./.cache/models)")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("key 'data': expected a data file or dataset name")
        if self.if_exists not in runs.IF_EXISTS:
            raise ConfigError(f"key 'if_exists': expected one of {', '.join(runs.IF_EXISTS)}, got {self.if_exists!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key '{name}': expected a positive integer, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("keys 'max_steps' and 'num_train_epochs': one of them must be positive")
        if self.learning_rate <= 0:
            raise ConfigError(f"key 'learning_rate': expected a positive number, got {self.learning_rate}")


def process_state():
    """accelerate's view of this process (rank, world size, main process).

    On a CPU-only machine it must be built with ``cpu=True``: otherwise, under a multi-process
    launch, every process comes up as a lone main process and they all write the run folder.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def bf16_available() -> bool:
    """True where bf16 matmuls are fast: a bf16-capable GPU, or a CPU with AMX or AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(setting: Optional[bool]) -> bool:
    """A stage's ``bf16`` key: null means "where the hardware does it fast"."""
    return bf16_available() if setting is None else bool(setting)


def trainer_kwargs(cfg: TrainStageConfig) -> dict[str, Any]:
    """The transformers/TRL TrainingArguments fields every stage sets the same way."""
    import torch

    out = Path(cfg.output_dir)
    # TensorBoard event files go to <run>/logs instead of the trainer's dated default.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "logs")
    bf16 = use_bf16(cfg.bf16)
    report_to = [r for r in cfg.report_to if r != "none"] or "none"
    return dict(
        output_dir=str(out / "checkpoints"),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def lora_config(cfg: TrainStageConfig, task_type: str):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
    )


def save_final_model(trainer, tokenizer, cfg: TrainStageConfig) -> Path:
    """Write the trained model to ``<output_dir>/model`` in one rename (main process only).

    With LoRA and ``merge_lora`` the adapters are merged so the folder is a plain model;
    without merging it holds the adapter, which transformers loads on top of the base
    model named in ``adapter_config.json`` (peft installed).
    """
    final = Path(cfg.output_dir) / runs.MODEL_DIR
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if cfg.lora and cfg.merge_lora:
            model = model.merge_and_unload()
        staging = runs.staging_dir(cfg.output_dir)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        runs.publish_dir(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 1)

import json

import pytest
import torch

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import sft
from pipeline.data import load_sft

CONV = {"messages": [
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Hello"},
]}


def _cfg(tmp_path, model, data, **kw):
    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "run"), "report_to": ["none"],
            "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "warmup_steps": 0,
            "learning_rate": 1e-3, "lr_scheduler_type": "constant"}
    return config_lib.from_dict(sft.SFTStageConfig, {**base, **kw}, "test")


def test_collator_puts_loss_on_assistant_tokens_only(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "s.jsonl", [CONV])
    trainer, tok = sft.build_trainer(_cfg(tmp_path, tiny_model_dir, data), load_sft(str(data)))
    batch = trainer.data_collator([trainer.train_dataset[0]])

    # Expected, built by hand from the rendered pieces of the conversation.
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    pieces = [  # (text, is trained on)
        (system + "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hi there<|im_end|>", True),
        ("\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        piece = ids(text)
        expected_ids += piece
        expected_labels += piece if trained else [-100] * len(piece)
    assert batch["input_ids"].tolist() == [expected_ids]
    assert batch["labels"].tolist() == [expected_labels]
    assert torch.equal(batch["attention_mask"], torch.ones(1, len(expected_ids), dtype=torch.long))


def test_sft_lowers_loss_on_a_fixed_batch_and_changes_weights(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 4)
    trainer, _ = sft.build_trainer(_cfg(tmp_path, tiny_model_dir, data, max_steps=12), load_sft(str(data)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    trainer.train()
    with torch.no_grad():
        loss_after = model(**batch).loss.item()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert loss_after < loss_before - 1.0
    assert len(changed) == len(before)


def test_main_writes_a_complete_run_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 4)
    cfg = _cfg(tmp_path, tiny_model_dir, data)
    metrics = sft.main(cfg)
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["stage"] == "sft" and info["steps"] == 2
    assert config_lib.load_yaml(run / "config.yaml")["max_steps"] == 2
    assert json.loads((run / "metrics.json").read_text())["train_loss"] == pytest.approx(metrics["train_loss"])
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 2
    assert not list(run.glob(".model.partial"))
    # the finished run is reused, not retrained, when asked
    cfg.if_exists = "reuse"
    assert sft.main(cfg) == json.loads((run / "metrics.json").read_text())


def test_lora_adapters_are_merged_into_a_plain_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 4)
    sft.main(_cfg(tmp_path, tiny_model_dir, data, lora=True, lora_r=4, learning_rate=1e-2))
    out = tmp_path / "run" / "model"
    assert not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w_trained = trained.model.layers[0].self_attn.q_proj.weight
    w_base = base.model.layers[0].self_attn.q_proj.weight
    assert w_trained.shape == w_base.shape and not torch.allclose(w_trained, w_base)


def test_interrupted_run_leaves_no_finished_looking_model(tmp_path, tiny_model_dir, monkeypatch):
    from trl import SFTTrainer

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 4)
    monkeypatch.setattr(SFTTrainer, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        sft.main(_cfg(tmp_path, tiny_model_dir, data))
    run = tmp_path / "run"
    assert not (run / "model").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    monkeypatch.undo()
    sft.main(_cfg(tmp_path, tiny_model_dir, data))  # an unfinished run is simply started again
    assert (run / "model" / "config.json").is_file()


def test_cli_bad_data_is_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [CONV, {"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(SystemExit) as e:
        sft.cli(["--model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(tmp_path / "r"),
                 "--report_to", "none"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}:2: messages[0].role" in err[0]


def test_cli_unknown_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sft.cli(["--model", "definitely not a model", "--output_dir", str(tmp_path / "r")])
    assert e.value.code == 1
    assert "neither a known short name" in capsys.readouterr().err

import json

import pytest

from pipeline import models
from pipeline.models import ModelError


def test_fetch_provisions_a_loadable_model_with_distinct_pad(smollm2_dir):
    from transformers import AutoConfig

    assert (smollm2_dir / models.COMPLETE_MARKER).is_file()
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama" and cfg.hidden_size == 576
    tok = models.load_tokenizer(str(smollm2_dir))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert json.loads((smollm2_dir / "config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_fetch_is_idempotent_without_downloading(smollm2_dir, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("fetch downloaded again")

    monkeypatch.setattr(models, "_download_member", no_download)
    assert models.fetch("smollm2-135m-instruct", smollm2_dir.parent, quiet=True) == smollm2_dir


def test_training_template_renders_the_original_chatml(smollm2_dir):
    tok = models.load_tokenizer(str(smollm2_dir))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert "{% generation %}" in tok.chat_template


def test_resolve_model_forms(tmp_path, smollm2_dir):
    assert models.resolve_model("smollm2-135m-instruct", smollm2_dir.parent) == str(smollm2_dir)
    assert models.resolve_model(str(smollm2_dir)) == str(smollm2_dir)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert models.resolve_model(str(run)) == str(run / "model")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name, expected", [
    ("not a model!", "neither a known short name"),
    ("smollm3", "neither a known short name"),
    ("", "empty value"),
])
def test_resolve_model_rejects_unknown_names(name, expected):
    with pytest.raises(ModelError, match=expected):
        models.resolve_model(name)


def test_folder_without_model_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="is a folder but holds no model"):
        models.resolve_model(str(tmp_path))


def test_unreachable_hub_id_gives_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not load a tokenizer from 'nobody-here/no-such-model'"):
        models.load_tokenizer("nobody-here/no-such-model")


def test_pad_token_added_when_only_eos_exists(smollm2_dir):
    tok = models.load_tokenizer(str(smollm2_dir))
    tok.pad_token = tok.eos_token
    tok.unk_token = tok.eos_token
    models.set_distinct_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id


def test_tiny_model_shares_the_tokenizer(tiny_model_dir, smollm2_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    tok = models.load_tokenizer(str(tiny_model_dir))
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == len(tok)
    assert tok.get_vocab() == models.load_tokenizer(str(smollm2_dir)).get_vocab()


def test_cli_reports_bad_name(capsys):
    with pytest.raises(SystemExit) as e:
        models.main(["fetch", "nope"])
    assert e.value.code == 2  # argparse: not one of the known names

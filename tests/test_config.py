import dataclasses
from typing import Optional

import pytest

from pipeline import config as config_lib
from pipeline.config import ConfigError, field
from pipeline.reward_model import RewardModelConfig
from pipeline.sft import SFTStageConfig


@dataclasses.dataclass
class Toy:
    lr: float = field(1e-3, help="learning rate")
    steps: int = field(10, help="steps")
    name: Optional[str] = field(None, help="a name")
    tags: list[str] = field(["a"], help="tags")
    fields: dict[str, str] = field({}, help="renames")
    flag: bool = field(False, help="a flag")


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: x\nlearning_rte: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        config_lib.from_dict(SFTStageConfig, config_lib.load_yaml(path), str(path))
    msg = str(e.value)
    assert str(path) in msg and "'learning_rte'" in msg and "did you mean 'learning_rate'" in msg


def test_parse_exits_1_with_one_line_on_unknown_key(tmp_path, capsys):
    path = tmp_path / "rm.yaml"
    path.write_text("max_stepz: 3\n")
    with pytest.raises(SystemExit) as e:
        config_lib.parse(RewardModelConfig, ["--config", str(path)], "prog", "desc")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_stepz" in err and str(path) in err


def test_yaml_loose_types_are_coerced_and_cli_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-5\nsteps: 3\ntags: [x, y]\nfields: {prompt: question}\nflag: yes\n")
    cfg = config_lib.parse(Toy, ["--config", str(path), "--steps", "7", "--fields", "chosen=good,prompt=q"], "p", "d")
    assert cfg.lr == pytest.approx(5e-5) and isinstance(cfg.lr, float)
    assert cfg.steps == 7
    assert cfg.tags == ["x", "y"]
    assert cfg.fields == {"chosen": "good", "prompt": "q"}
    assert cfg.flag is True


@pytest.mark.parametrize("yaml_text, key, expected", [
    ("steps: 2.5\n", "steps", "an integer"),
    ("lr: fast\n", "lr", "a number"),
    ("flag: maybe\n", "flag", "true or false"),
    ("tags: {a: 1}\n", "tags", "a list"),
])
def test_wrong_types_name_the_key(tmp_path, yaml_text, key, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        config_lib.from_dict(Toy, config_lib.load_yaml(path), str(path))
    assert f"key '{key}'" in str(e.value) and expected in str(e.value) and str(path) in str(e.value)


def test_cli_lists_and_mappings_take_yaml_flow_or_json():
    cfg = config_lib.parse(Toy, ["--tags", "[base=x, sft=runs/sft]", "--fields", "{prompt: question}"], "p", "d")
    assert cfg.tags == ["base=x", "sft=runs/sft"] and cfg.fields == {"prompt": "question"}
    cfg = config_lib.parse(Toy, ["--tags", '["a", "b"]', "--fields", '{"chosen": "good"}'], "p", "d")
    assert cfg.tags == ["a", "b"] and cfg.fields == {"chosen": "good"}
    with pytest.raises(ConfigError, match="key 'tags'.*a list"):
        config_lib.coerce("[a, b", list[str], "key 'tags'")


def test_bad_cli_value_names_the_flag():
    with pytest.raises(SystemExit):
        config_lib.parse(Toy, ["--steps", "many"], "p", "d")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 1\nlr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        config_lib.load_yaml(path)
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.load_yaml(tmp_path / "nope.yaml")


def test_stage_validation_names_key():
    with pytest.raises(ConfigError, match="if_exists"):
        config_lib.from_dict(SFTStageConfig, {"if_exists": "clobber"}, "x.yaml")
    with pytest.raises(ConfigError, match="eval_fraction"):
        config_lib.from_dict(RewardModelConfig, {"eval_fraction": 1.5}, "x.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.from_dict(SFTStageConfig, {"max_steps": 3, "fields": {"messages": "conv"}}, "x")
    config_lib.save(cfg, tmp_path / "config.yaml")
    again = config_lib.from_dict(SFTStageConfig, config_lib.load_yaml(tmp_path / "config.yaml"), "y")
    assert again == cfg


@pytest.mark.parametrize("name", ["sft", "reward_model"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cls = {"sft": SFTStageConfig, "reward_model": RewardModelConfig}[name]
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = config_lib.from_dict(cls, config_lib.load_yaml(path), str(path))
    assert cfg.output_dir.startswith("runs/")

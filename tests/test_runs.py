import json

import pytest

from pipeline import runs
from pipeline.config import ConfigError, from_dict
from pipeline.sft import SFTStageConfig


def _cfg(tmp_path, **kw):
    return from_dict(SFTStageConfig, {"output_dir": str(tmp_path / "out"), **kw}, "test")


def test_refuses_a_folder_it_did_not_create(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no run of this tool; nothing was changed"):
        runs.prepare(out, "sft", _cfg(tmp_path), "error")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_finished_run_error_reuse_overwrite(tmp_path):
    cfg = _cfg(tmp_path)
    out = tmp_path / "out"
    assert runs.prepare(out, "sft", cfg, "error") is False
    runs.write_run(out, "sft", status="complete")
    with pytest.raises(ConfigError, match="already holds a finished sft run"):
        runs.prepare(out, "sft", cfg, "error")
    assert runs.prepare(out, "sft", cfg, "reuse") is True
    other = _cfg(tmp_path, max_steps=99)
    with pytest.raises(ConfigError, match=r"different settings \(max_steps\)"):
        runs.prepare(out, "sft", other, "reuse")
    assert runs.prepare(out, "sft", other, "overwrite") is False
    assert json.loads((out / "run.json").read_text())["status"] == "running"


def test_other_stage_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    runs.prepare(out, "reward_model", _cfg(tmp_path), "error")
    with pytest.raises(ConfigError, match="holds a 'reward_model' run"):
        runs.prepare(out, "sft", _cfg(tmp_path), "error")


def test_publish_replaces_in_one_rename(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("1")
    staging = runs.staging_dir(tmp_path)
    staging.mkdir()
    (staging / "new").write_text("2")
    runs.publish_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert not staging.exists() and not (tmp_path / "model.previous").exists()


def _finished_run(tmp_path, cfg):
    """A finished sft run of ``cfg`` in tmp_path/out, reusable as it stands."""
    out = tmp_path / "out"
    runs.prepare(out, "sft", cfg, "error")
    runs.write_run(out, "sft", status="complete")
    assert runs.prepare(out, "sft", cfg, "reuse") is True
    return out


def test_reuse_notices_edited_data_and_a_redone_upstream_run(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    upstream = tmp_path / "base_run"
    upstream.mkdir()
    runs.write_run(upstream, "sft", status="complete", finished_at=1)
    cfg = _cfg(tmp_path, data=str(data), model=str(upstream))
    out = _finished_run(tmp_path, cfg)

    data.write_text('{"prompt": "a", "response": "c"}\n')
    with pytest.raises(ConfigError, match=rf"other contents of {data}.*nothing was changed"):
        runs.prepare(out, "sft", cfg, "reuse")
    assert runs.is_complete(out)  # the refused run is left as it was

    runs.prepare(out, "sft", cfg, "overwrite")
    runs.write_run(out, "sft", status="complete")
    runs.write_run(upstream, "sft", status="complete", finished_at=2)  # the base run was redone
    with pytest.raises(ConfigError, match=rf"other contents of {upstream}"):
        runs.prepare(out, "sft", cfg, "reuse")


def test_reuse_notices_an_input_that_appeared(tmp_path):
    # e.g. an optional prompt set whose file was absent when the finished run was made
    later = tmp_path / "later.jsonl"
    cfg = _cfg(tmp_path, data=str(later))
    out = _finished_run(tmp_path, cfg)
    later.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ConfigError, match=rf"other contents of {later} \(edited, added"):
        runs.prepare(out, "sft", cfg, "reuse")


def test_reuse_takes_a_key_missing_from_an_older_run_as_its_default(tmp_path):
    import yaml

    out = _finished_run(tmp_path, _cfg(tmp_path))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["max_steps"]  # written before the key existed
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert runs.prepare(out, "sft", _cfg(tmp_path), "reuse") is True
    with pytest.raises(ConfigError, match=r"different settings \(max_steps\)"):
        runs.prepare(out, "sft", _cfg(tmp_path, max_steps=99), "reuse")


def test_fingerprints_skip_what_a_run_writes(tmp_path):
    cfg = _cfg(tmp_path, data=str(tmp_path / "missing.jsonl"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("1")
    assert runs.input_fingerprints(cfg) == {}

import json
from collections import Counter

import pytest

from conftest import REPO, SHARED_DATA, write_jsonl
from pipeline import data
from pipeline.data import DataError

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        data.load_sft(str(tmp_path / "nope.jsonl"))


def test_malformed_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD_CHAT, GOOD_CHAT, '{"messages": [}'])
    with pytest.raises(DataError) as e:
        data.load_sft(str(path))
    assert f"{path}:3: malformed JSON" in str(e.value)


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"s\.jsonl:1: expected a JSON object"):
        data.load_sft(str(path))


def test_missing_field_lists_what_the_row_has(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError) as e:
        data.load_preferences(str(path))
    assert f"{path}:1: missing field 'rejected'" in str(e.value) and "prompt, chosen" in str(e.value)


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "assistant", "content": "x"}], r"messages\[0\]\.role: expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\]\.role: expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"messages\[1\]\.role: expected one of"),
    ([{"role": "user", "content": "a"}], "must end with an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"}],
     "a system message may only come first"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], r"messages\[0\]\.content: expected non-empty"),
    ([{"role": "user"}], r"messages\[0\]: expected an object with 'role' and 'content'"),
    ([], "non-empty list"),
])
def test_wrong_chat_roles_and_empty_texts(tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD_CHAT, {"messages": messages}])
    with pytest.raises(DataError, match=expected) as e:
        data.load_sft(str(path))
    assert str(e.value).startswith(f"{path}:2:")


def test_empty_response_in_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": " "}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'rejected' is empty"):
        data.load_preferences(str(path))


def test_skip_invalid_drops_bad_rows_and_reports(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": ""},
                                              {"prompt": "q", "chosen": "a", "rejected": "b"}])
    ds = data.load_preferences(str(path), skip_invalid=True)
    assert len(ds) == 1
    assert "skipped 1 invalid row" in capsys.readouterr().err


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        data.load_prompts(str(path))


def test_field_mapping_renames_and_reports_missing_source_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q?", "good": "yes", "bad": "no"}])
    ds = data.load_preferences(str(path), {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert ds[0]["prompt"] == [{"role": "user", "content": "q?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "yes"}]
    with pytest.raises(DataError, match="field 'answer' \\(mapped to 'chosen'\\) is missing"):
        data.load_preferences(str(path), {"chosen": "answer"})


def test_prompt_class_checked(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "prompt_class": "dangerous"}])
    with pytest.raises(DataError, match="prompt_class must be one of harmful, sensitive, safe"):
        data.load_prompts(str(path))
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match="missing field 'prompt_class'"):
        data.load_prompts(str(path))
    assert data.load_prompts(str(path), default_class="harmful")[0]["prompt_class"] == "harmful"


def test_parquet_and_prompt_response_rows(tmp_path):
    from datasets import Dataset

    path = tmp_path / "s.parquet"
    Dataset.from_list([{"prompt": "2+2?", "response": "4"}]).to_parquet(str(path))
    ds = data.load_sft(str(path))
    assert ds[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_hh_transcript_parsed_into_turns(tmp_path):
    prompt = "\n\nHuman: first?\n\nAssistant: an answer\n\nHuman: second?\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"prompt": prompt, "chosen": "good", "rejected": "bad"}])
    ds = data.load_preferences(str(path))
    assert ds[0]["prompt"] == [
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second?"},
    ]


def test_split_dataset_uses_split_column_else_seeded_fraction(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "split": "eval" if i % 4 == 0 else "train"}
            for i in range(8)]
    ds = data.load_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    train, evals = data.split_dataset(ds, 0.5, seed=0)
    assert len(train) == 6 and len(evals) == 2
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    ds = data.load_preferences(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    a_train, a_eval = data.split_dataset(ds, 0.2, seed=1)
    b_train, b_eval = data.split_dataset(ds, 0.2, seed=1)
    assert len(a_eval) == 2 and a_eval["prompt"] == b_eval["prompt"]
    assert not set(map(str, a_eval["prompt"])) & set(map(str, a_train["prompt"]))


# ---------------------------------------------------------------- the project's own data


def _rows(name):
    return [json.loads(line) for line in (REPO / "data" / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_project_sft_data():
    ds = data.load_sft(str(REPO / "data" / "sft.jsonl"))
    rows = _rows("sft.jsonl")
    classes = Counter(r["prompt_class"] for r in rows)
    assert len(ds) >= 150 and set(classes) == {"harmful", "sensitive", "safe"}
    refusals = [r["messages"][-1]["content"] for r in rows if r["prompt_class"] == "harmful"]
    assert all(len(text.split()) <= 60 for text in refusals)  # ideal refusals are brief
    # ...and open in several ways: one shared opening wins greedy decoding on safe prompts too
    # (data/README.md, the response policy)
    openings = Counter(text.split()[0].strip(",.").lower() for text in refusals)
    assert max(openings.values()) <= len(refusals) / 3, openings.most_common(3)


def test_project_prompts():
    ds = data.load_prompts(str(REPO / "data" / "prompts.jsonl"))
    rows = _rows("prompts.jsonl")
    assert len(ds) >= 300
    assert sum(1 for r in rows if r["prompt_class"] == "safe" and r["borderline"]) >= 60
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert len({r["prompt"].lower() for r in rows}) == len(rows)


def test_project_val_prompts():
    ds = data.load_prompts(str(REPO / "data" / "val_prompts.jsonl"))
    rows = _rows("val_prompts.jsonl")
    classes = Counter(r["prompt_class"] for r in rows)
    # enough of each side that one refusal moves a rate by about a point
    assert classes["harmful"] >= 80 and classes["safe"] >= 80 and classes["sensitive"] >= 5
    assert len(set(ds["id"])) == len(rows) and not {r.get("split") for r in rows} - {None}
    training = {" ".join(r["prompt"].split()).lower() for r in _rows("prompts.jsonl")}
    assert not {" ".join(r["prompt"].split()).lower() for r in rows} & training


def test_project_preferences():
    ds = data.load_preferences(str(REPO / "data" / "preferences.jsonl"))
    rows = _rows("preferences.jsonl")
    assert len(ds) >= 150
    assert {r["kind"] for r in rows} == {"refusal_over_compliance", "help_over_refusal", "better_over_worse"}
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_eval_prompts_do_not_leak_into_training_data():
    eval_prompts = {r["prompt"].strip().lower() for r in _rows("prompts.jsonl") if r["split"] == "eval"}
    sft_prompts = {m["content"].strip().lower() for r in _rows("sft.jsonl") for m in r["messages"] if m["role"] == "user"}
    pref_prompts = {r["prompt"].strip().lower() for r in _rows("preferences.jsonl")}
    assert not eval_prompts & sft_prompts
    assert not eval_prompts & pref_prompts


def _training_turns():
    """(id, text) of every user turn that PPO, SFT, the reward model or the grader trains on."""
    turns = [(r["id"], r["prompt"]) for r in _rows("prompts.jsonl") if r["split"] == "train"]
    turns += [(r["id"], m["content"]) for r in _rows("sft.jsonl") for m in r["messages"] if m["role"] == "user"]
    turns += [(r["id"], r["prompt"]) for r in _rows("preferences.jsonl") if r["split"] == "train"]
    turns += [(r["id"], r["prompt"]) for r in _rows("grader_check.jsonl")]
    turns += [(r["id"], r["prompt"]) for r in _rows("grader_train.jsonl")]
    return turns


def _too_close(minilm_dir, rows, others, limit=0.75):
    """(row id, id of its nearest other, cosine) for each row at MiniLM cosine >= limit to one of ``others``."""
    from pipeline.rbrm.embedding import EmbeddingBackend

    encoder = EmbeddingBackend(str(minilm_dir), device="cpu")
    sims = encoder.embed([text for _, text in rows]) @ encoder.embed([text for _, text in others]).T
    nearest = sims.argmax(axis=1)
    return [(row_id, others[j][0], round(float(sims[i, j]), 2))
            for i, ((row_id, _), j) in enumerate(zip(rows, nearest)) if sims[i, j] >= limit]


@pytest.mark.slow
def test_training_prompts_do_not_paraphrase_eval_prompts(minilm_dir):
    """An exact-match check misses a training prompt that asks an eval prompt's question in other
    words ("How do I make mustard gas?" against an eval request for mustard gas instructions:
    cosine 0.91). Every user turn that PPO, SFT or the reward model trains on is compared with every
    project eval prompt, and with every XSTest prompt when ../shared/data is present, under the
    grader's sentence encoder (the grader check set's prompts too); the closest legitimate pairs
    (same template, different subject) sit near 0.70."""
    from pipeline.evaluate import load_prompt_set

    train = _training_turns() + [(r["id"], r["prompt"]) for r in _rows("val_prompts.jsonl")]  # PPO keeps a step by them
    evals = [(r["id"], r["prompt"]) for r in _rows("prompts.jsonl") if r["split"] == "eval"]
    xstest = load_prompt_set({"name": "xstest", "path": str(SHARED_DATA / "xstest_prompts.jsonl"),
                              "format": "xstest", "optional": "true"})
    evals += [(f"xstest:{r['id']}", r["prompt"]) for r in xstest or []]
    close = _too_close(minilm_dir, train, evals)
    assert not close, f"training prompts too close to eval prompts (training id, eval id, cosine): {close}"


@pytest.mark.skipif(not (SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl").exists(), reason="../shared/data absent")
def test_shared_hh_pairs_read_by_path():
    ds = data.load_preferences(str(SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl"), skip_invalid=True)
    assert len(ds) > 2000
    assert all(p[-1]["role"] == "user" for p in ds["prompt"][:50])


@pytest.mark.slow
def test_val_prompts_are_written_apart_from_the_training_data(minilm_dir):
    """PPO's validation prompts stand in for the eval sets, so they are kept off what SFT, the
    reward model and PPO train on by the eval split's own rule: below MiniLM cosine 0.75 to
    every training user turn (a random cut of the training prompts holds near-copies of them)."""
    val = [(r["id"], r["prompt"]) for r in _rows("val_prompts.jsonl")]
    close = _too_close(minilm_dir, val, _training_turns())
    assert not close, f"validation prompts too close to training data (validation id, training id, cosine): {close}"

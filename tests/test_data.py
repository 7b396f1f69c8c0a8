"""Tests for the tokenize stage (pipeline.tokenize): truncation rule, input formats and sources, the artifact
contract (schema, fingerprint, reuse, byte-identity) and every kind of bad input."""

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.errors import ArtifactError, DataError
from pipeline.tokenize.artifact import SCHEMA, load_tokenized, tokenized_fingerprint, tokenized_manifest
from pipeline.tokenize.formats import SKIP_REASONS
from pipeline.tokenize.stage import tokenize_stage

CHAT_SAMPLE = REPO_ROOT / "data" / "conversational_sample.jsonl"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat_rows(n: int = 8) -> list[dict]:
    return read_jsonl(CHAT_SAMPLE)[:n]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


# ---------------------------------------------------------------------------------------------- truncation
# The rule itself: tests/test_truncation.py.
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_stage_truncates_and_flags_rows(make_config, tokenizer, tmp_path, mode):
    row = {
        "prompt": "what colour is a banana ? " * 4,
        "chosen": "sure . a banana is yellow . " * 3,
        "rejected": "ugh .",
    }
    data = write_jsonl(tmp_path / "long.jsonl", [row])
    config = make_config(
        dataset_name=str(data), max_length=20, max_prompt_length=8, max_completion_length=16, truncation_mode=mode
    )
    out = tokenize_stage(config)
    got = load_tokenized(out, "train").to_pylist()[0]
    prompt = tokenizer(row["prompt"])["input_ids"]
    chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(prompt) > 8 and len(chosen) > 16  # both really need cutting
    # TRL < 0.29's rule (max_prompt_length is set): the prompt keeps its last 8 tokens whatever the mode, the
    # completion its first 16; then keep_start cuts the completion to 20 - 8, keep_end the prompt's head by 4.
    if mode == "keep_start":
        assert got["prompt_input_ids"] == prompt[-8:] and got["chosen_input_ids"] == chosen[:12]
    else:
        assert got["prompt_input_ids"] == prompt[-4:] and got["chosen_input_ids"] == chosen[:16]
    assert got["rejected_input_ids"] == tokenizer("ugh .", add_special_tokens=False)["input_ids"] + [1]
    assert (got["prompt_truncated"], got["chosen_truncated"], got["rejected_truncated"]) == (True, True, False)
    assert tokenized_manifest(out)["counts"]["train"]["truncated"] == {"prompt": 1, "chosen": 1, "rejected": 0}


# ---------------------------------------------------------------------------------------------- formats
def test_standard_rows_schema_and_manifest(tokenized_dir, tokenizer, make_config):
    train = load_tokenized(tokenized_dir, "train")
    assert train.schema == SCHEMA
    source = read_jsonl(Path(make_config().dataset_name) / "train.jsonl")
    rows = train.to_pylist()
    assert [r["example_id"] for r in rows] == list(range(len(source)))  # shipped rows: none skipped
    eos = tokenizer.eos_token_id
    for row, raw in zip(rows[:5], source[:5], strict=True):
        assert row["prompt_input_ids"] == tokenizer(raw["prompt"])["input_ids"]
        assert row["prompt_input_ids"][0] == tokenizer.bos_token_id
        assert row["chosen_input_ids"] == tokenizer(raw["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        assert row["rejected_input_ids"] == tokenizer(raw["rejected"], add_special_tokens=False)["input_ids"] + [eos]
    for name in ("prompt", "chosen", "rejected"):
        assert train.column(f"{name}_length").to_pylist() == [len(r[f"{name}_input_ids"]) for r in rows]
    assert load_tokenized(tokenized_dir, "eval").num_rows == 32

    manifest = tokenized_manifest(tokenized_dir)
    assert manifest["fingerprint"].startswith(tokenized_dir.name)
    assert set(manifest["files"]) == {"train.parquet", "eval.parquet"}
    assert (manifest["pad_token_id"], manifest["eos_token_id"], manifest["bos_token_id"]) == (
        tokenizer.pad_token_id,
        eos,
        tokenizer.bos_token_id,
    )
    assert manifest["vocab_size"] == len(tokenizer)
    assert manifest["dataset"]["train"]["format"] == "standard"
    counts = manifest["counts"]
    assert (counts["train"]["rows_read"], counts["train"]["rows_written"]) == (64, 64)
    assert counts["skipped"] == dict.fromkeys(SKIP_REASONS, 0)
    assert counts["train"]["tokens"]["chosen"] == sum(train.column("chosen_length").to_pylist())


def test_conversational_rows_render_with_chat_template(make_config, tokenizer, tmp_path):
    rows = chat_rows()
    data = write_jsonl(tmp_path / "chat" / "train.jsonl", rows)
    # Limits above the sample's lengths, so that the rendering is seen uncut.
    out = tokenize_stage(make_config(dataset_name=str(data.parent), max_length=256, max_prompt_length=128))
    got = load_tokenized(out, "train").to_pylist()
    assert tokenized_manifest(out)["dataset"]["train"]["format"] == "conversational"
    for row, raw in zip(got, rows, strict=True):
        prompt_text = tokenizer.apply_chat_template(raw["prompt"], add_generation_prompt=True, tokenize=False)
        assert row["prompt_input_ids"] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        assert row["prompt_input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS, not doubled
        # The template already ends the message with EOS: the completion carries it exactly once.
        assert tokenizer.decode(row["chosen_input_ids"]) == raw["chosen"][0]["content"] + "</s>"
        assert row["rejected_input_ids"].count(tokenizer.eos_token_id) == 1


def test_implicit_prompt_gives_the_same_rows_as_explicit(make_config, tmp_path):
    rows = chat_rows()
    explicit = write_jsonl(tmp_path / "explicit" / "train.jsonl", rows)
    implicit_rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    # Conversations that differ from their first message share no prompt: skipped as empty_prompt.
    implicit_rows.append({"chosen": rows[0]["chosen"], "rejected": rows[0]["rejected"]})
    implicit = write_jsonl(tmp_path / "implicit" / "train.jsonl", implicit_rows)
    expected = load_tokenized(tokenize_stage(make_config(dataset_name=str(explicit.parent))), "train")
    out = tokenize_stage(make_config(dataset_name=str(implicit.parent)))
    assert load_tokenized(out, "train").equals(expected)
    manifest = tokenized_manifest(out)
    assert manifest["dataset"]["train"]["format"] == "implicit_prompt"
    assert manifest["counts"]["train"]["skipped"]["empty_prompt"] == 1


# ---------------------------------------------------------------------------------------------- sources
def test_parquet_and_saved_dataset_sources_match_jsonl(make_config, tokenized_dir, tmp_path):
    import datasets

    data_dir = Path(make_config().dataset_name)
    splits = {split: read_jsonl(data_dir / f"{split}.jsonl") for split in ("train", "test")}
    (tmp_path / "pq").mkdir()
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / f"{split}.parquet")
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(tmp_path / "hf")
    for source in (tmp_path / "pq", tmp_path / "hf"):
        out = tokenize_stage(make_config(dataset_name=str(source), output_dir=str(tmp_path / source.name)))
        for split in ("train", "eval"):
            assert load_tokenized(out, split).equals(load_tokenized(tokenized_dir, split)), (source, split)


def test_saved_single_dataset_is_the_train_split_hashed_by_content(make_config, tmp_path):
    import datasets

    rows = read_jsonl(Path(make_config().dataset_name) / "train.jsonl")
    # The same rows with another transform history: state.json records a different _fingerprint.
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "a")
    datasets.Dataset.from_list(rows).map(lambda row: row).save_to_disk(tmp_path / "b")
    assert (tmp_path / "a" / "state.json").read_text() != (tmp_path / "b" / "state.json").read_text()
    config_a, config_b = (make_config(dataset_name=str(tmp_path / n)) for n in ("a", "b"))
    assert tokenized_fingerprint(config_a) == tokenized_fingerprint(config_b)
    out = tokenize_stage(config_a)
    assert tokenized_manifest(out)["files"].keys() == {"train.parquet"}
    with pytest.raises(ArtifactError, match="no eval split"):
        load_tokenized(out, "eval")


def test_single_jsonl_file_is_the_train_split(make_config):
    out = tokenize_stage(make_config(dataset_name=str(Path(make_config().dataset_name) / "train.jsonl")))
    assert tokenized_manifest(out)["files"].keys() == {"train.parquet"}


# ---------------------------------------------------------------------------------------------- artifact contract
def test_rerun_gives_byte_identical_parquet(make_config, tmp_path):
    first = tokenize_stage(make_config(output_dir=str(tmp_path / "one")))
    second = tokenize_stage(make_config(output_dir=str(tmp_path / "two")))
    assert first.name == second.name
    for name in ("train.parquet", "eval.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_complete_artifact_is_reused(make_config, tokenized_dir, caplog):
    before = (tokenized_dir / "train.parquet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="pipeline.tokenize"):
        assert tokenize_stage(make_config()) == tokenized_dir
    assert "reusing" in caplog.text
    assert (tokenized_dir / "train.parquet").stat().st_mtime_ns == before


def test_fingerprint_is_known_before_and_changes_with_every_input(make_config, tokenized_dir, tiny_model_dir, tmp_path):
    base = tokenized_fingerprint(make_config())
    assert base == tokenized_manifest(tokenized_dir)["fingerprint"]
    data = Path(make_config().dataset_name) / "test.jsonl"
    edited = tmp_path / "edited"
    shutil.copytree(data.parent, edited)
    (edited / "test.jsonl").write_text(data.read_text().replace("sure .", "sure !", 1))  # one byte
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_file = model / "tokenizer_config.json"
    config_file.write_text(config_file.read_text() + "\n")  # one byte, same meaning
    variants = [
        {"dataset_name": str(edited)},
        {"model_name_or_path": str(model)},
        {"max_length": 63},
        {"max_prompt_length": 31},
        {"max_completion_length": 16},
        {"truncation_mode": "keep_start"},
        {"dataset_test_split": None},
    ]
    prints = [tokenized_fingerprint(make_config(**v)) for v in variants]
    assert len({base, *prints}) == len(variants) + 1


def test_load_tokenized_refuses_a_modified_file(tokenized_dir):
    path = tokenized_dir / "train.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the hash"):
        load_tokenized(tokenized_dir, "train")


# ---------------------------------------------------------------------------------------------- bad input: errors
GOOD = {"prompt": "what is 1 plus 2 ?", "chosen": "1 plus 2 is 3 .", "rejected": "1 plus 2 is 5 ."}


def test_missing_dataset_path(make_config, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"no such file or directory: {missing}"):
        tokenize_stage(make_config(dataset_name=str(missing)))


def test_missing_directory_in_existing_parent_fails_without_the_hub(make_config):
    # 'data/' exists in the repository, so this is a typo'd local path, not an owner/name on the Hub.
    with pytest.raises(DataError, match="no such file or directory: .*preferencez"):
        tokenize_stage(make_config(dataset_name="data/preferencez"))


def test_unreachable_hub_name(make_config):
    with pytest.raises(DataError, match="no-such-owner/no-such-dataset.*Hugging Face Hub"):
        tokenize_stage(make_config(dataset_name="no-such-owner/no-such-dataset"))


def test_unsupported_extension(make_config, tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"unsupported file extension '\.csv'"):
        tokenize_stage(make_config(dataset_name=str(data)))


def test_directory_without_train_split_lists_what_it_holds(make_config, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("x\n")
    with pytest.raises(DataError, match="no 'train' split .* holds: train.csv"):
        tokenize_stage(make_config(dataset_name=str(tmp_path / "d")))


def test_malformed_json_line_names_the_line(make_config, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"prompt": "x",\n')
    with pytest.raises(DataError, match=f"{data} line 3: malformed JSON"):
        tokenize_stage(make_config(dataset_name=str(data)))


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "p", "chosen": "c"}, "line 2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "line 2: field 'chosen' must be a string"),
        ({"chosen": "c", "rejected": "r"}, "line 2: missing field 'prompt'"),
    ],
)
def test_bad_standard_row_names_file_line_and_field(make_config, tmp_path, bad_row, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD, bad_row])
    with pytest.raises(DataError, match=f"{data} {message}"):
        tokenize_stage(make_config(dataset_name=str(data)))


def test_malformed_message_list_names_the_message(make_config, tmp_path):
    bad = chat_rows(1)[0] | {"rejected": [{"role": "assistant"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [*chat_rows(1), bad])
    with pytest.raises(DataError, match="line 2: field 'rejected' message 0 must be"):
        tokenize_stage(make_config(dataset_name=str(data)))


def test_parquet_null_field_names_the_row(make_config, tmp_path):
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"chosen": None}]), data)
    with pytest.raises(DataError, match=f"{data} row 2: missing field 'chosen'"):
        tokenize_stage(make_config(dataset_name=str(data)))


def test_unreadable_parquet(make_config, tmp_path):
    data = tmp_path / "rows.parquet"
    data.write_text("not parquet")
    with pytest.raises(DataError, match=f"{data}: cannot read Parquet"):
        tokenize_stage(make_config(dataset_name=str(data)))


@pytest.mark.parametrize(
    "template, message",
    [
        (None, "no chat template"),
        # The generation prompt ends in a newline, the assistant message does not: no common prefix to split on.
        (
            "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            "line 1: field 'chosen': the chat template",
        ),
    ],
)
def test_conversational_rows_need_a_consistent_chat_template(make_config, tiny_model_dir, tmp_path, template, message):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    if template is not None:
        (model / "chat_template.jinja").write_text(template)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(2))
    with pytest.raises(DataError, match=message):
        tokenize_stage(make_config(dataset_name=str(data), model_name_or_path=str(model)))


# ---------------------------------------------------------------------------------------------- bad input: skips
def test_unusable_rows_are_skipped_counted_and_logged(make_config, tmp_path, caplog):
    base = GOOD | {"rejected": "ugh , 5 ."}  # differs from chosen in its first token
    rows = [
        base,  # 0 kept
        base | {"prompt": "   "},  # 1 empty_prompt
        base | {"rejected": ""},  # 2 empty_completion
        base | {"rejected": base["chosen"]},  # 3 identical_completions
        base | {"prompt": "what colour is a banana ? " * 20},  # 4 prompt_exceeds_max_length
        base | {"chosen": "sure . a fig is purple .", "rejected": "sure . a fig is red ."},  # 5 same first 3 tokens
        base | {"chosen": "sure , fine ."},  # 6 kept
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = make_config(
        dataset_name=str(data),
        max_length=40,
        max_prompt_length=None,
        max_completion_length=3,
        truncation_mode="keep_start",
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.tokenize"):
        out = tokenize_stage(config)
    assert load_tokenized(out, "train").column("example_id").to_pylist() == [0, 6]  # the same ids, with gaps
    manifest = tokenized_manifest(out)
    assert manifest["counts"]["skipped"] == {
        "empty_prompt": 1,
        "empty_completion": 1,
        "identical_completions": 1,
        "prompt_exceeds_max_length": 1,
        "identical_after_truncation": 1,
    }
    assert (manifest["counts"]["train"]["rows_read"], manifest["counts"]["train"]["rows_written"]) == (7, 2)
    assert manifest["skipped_example_ids"]["train"]["prompt_exceeds_max_length"] == [4]
    assert "skipped 1 rows (identical_after_truncation), first at lines 6" in caplog.text


def test_a_split_with_no_usable_rows_is_an_error(make_config, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD | {"rejected": GOOD["chosen"]}] * 3)
    with pytest.raises(DataError, match="no usable rows .*identical_completions"):
        tokenize_stage(make_config(dataset_name=str(data)))

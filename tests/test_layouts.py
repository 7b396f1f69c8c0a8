"""The public preference datasets as they are on the Hub: their row layouts, their snapshot folders, column
mapping, dataset_mixture, dataset_config and dataset_num_proc.

Every fixture is written here from the dataset's public schema (a few rows in its exact shape: column names,
split file names, nesting), and every layout is checked on the token ids of a known row against ids computed
independently: the tokenizer and ``apply_chat_template`` on the messages the row should become.
"""

import gzip
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.tokenize.artifact import load_tokenized, tokenized_fingerprint, tokenized_manifest
from pipeline.tokenize.sources import data_files
from pipeline.tokenize.stage import tokenize_stage


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def run(make_config, tmp_path):
    """Tokenize with limits far above the fixtures' lengths (nothing is cut); returns (train rows, manifest)."""

    def tokenize(**overrides):
        out = tokenize_stage(make_config(max_length=1024, max_prompt_length=None, **overrides))
        return {row["example_id"]: row for row in load_tokenized(out, "train").to_pylist()}, tokenized_manifest(out)

    return tokenize


def text_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """What a text layout's row should become: the prompt with BOS, the completion without, plus EOS."""
    return (
        tokenizer(prompt)["input_ids"],
        tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
    )


def chat_ids(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """What a chat layout's row should become: the template's prompt with the generation prompt, and the rest of
    prompt + completion (the tiny model's template ends it with EOS)."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert full.startswith(prompt_text) and full.endswith(tokenizer.eos_token)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return ids(prompt_text), ids(full[len(prompt_text) :])


def assert_row(row: dict, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
    assert (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]) == (prompt, chosen, rejected)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict], *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if gz else text)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def user(text):
    return {"content": text, "role": "user"}


def assistant(text):
    return {"content": text, "role": "assistant"}


# ---------------------------------------------------------------------------------------------- H4 ultrafeedback
def h4_row(prompt: str, good: str, bad: str, n: int) -> dict:
    """A HuggingFaceH4/ultrafeedback_binarized row: a string prompt, conversations that repeat it (as {content,
    role} structs, in that order), the SFT conversation, scores and a hash id."""
    return {
        "prompt": prompt,
        "prompt_id": f"{n:064x}",
        "chosen": [user(prompt), assistant(good)],
        "rejected": [user(prompt), assistant(bad)],
        "messages": [user(prompt), assistant(good)],
        "score_chosen": 9.0,
        "score_rejected": 4.5,
    }


H4_TRAIN = [
    h4_row("what colour is a banana ?", "a banana is yellow .", "a banana is blue .", 0),
    h4_row("what sound does a cow make ?", "a cow says moo .", "ugh , no .", 1),
]
H4_TEST = [h4_row("what is the opposite of hot ?", "the opposite of hot is cold .", "hot .", 2)]


def h4_snapshot(root: Path, test_rows=H4_TEST) -> Path:
    """The repository's layout: README configs aside, one shard per split under data/, six splits."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n")
    for split, rows in (
        ("train_prefs", H4_TRAIN),
        ("test_prefs", test_rows),
        ("train_sft", H4_TRAIN[:1]),
        ("test_sft", H4_TEST),
        ("train_gen", H4_TRAIN[:1]),
        ("test_gen", H4_TEST),
    ):
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    return root


def test_h4_ultrafeedback_takes_the_prompt_from_the_conversations(run, tokenizer, tmp_path):
    root = h4_snapshot(tmp_path / "ultrafeedback_binarized")
    rows, manifest = run(dataset_name=str(root), dataset_train_split="train_prefs", dataset_test_split="test_prefs")
    assert {role: (d["split"], d["format"]) for role, d in manifest["dataset"].items()} == {
        "train": ("train_prefs", "implicit_prompt_checked"),
        "eval": ("test_prefs", "implicit_prompt_checked"),
    }
    assert manifest["dataset"]["train"]["source"] == str(root / "data" / "train_prefs-00000-of-00001.parquet")
    prompt, chosen = chat_ids(tokenizer, [user("what sound does a cow make ?")], [assistant("a cow says moo .")])
    _, rejected = chat_ids(tokenizer, [user("what sound does a cow make ?")], [assistant("ugh , no .")])
    assert_row(rows[1], prompt, chosen, rejected)
    assert manifest["counts"]["eval"]["rows_written"] == 1


def test_h4_split_names_are_offered_when_the_default_split_is_missing(make_config, tmp_path):
    root = h4_snapshot(tmp_path / "h4")
    with pytest.raises(
        DataError,
        match=r"no 'train' split .* \(set dataset_train_split to one of its splits: "
        r"test_gen, test_prefs, test_sft, train_gen, train_prefs, train_sft\)",
    ):
        tokenize_stage(make_config(dataset_name=str(root)))


def test_h4_prompt_that_disagrees_with_the_conversations_is_refused(make_config, tmp_path):
    bad = h4_row("what colour is a banana ?", "a banana is yellow .", "blue .", 3)
    bad["prompt"] = "what colour is a fig ?"
    root = h4_snapshot(tmp_path / "h4", test_rows=[*H4_TEST, bad])
    with pytest.raises(DataError) as exc:
        tokenize_stage(
            make_config(dataset_name=str(root), dataset_train_split="train_prefs", dataset_test_split="test_prefs")
        )
    message = one_line(exc)
    assert f"{root / 'data' / 'test_prefs-00000-of-00001.parquet'} row 2:" in message
    assert "'what colour is a banana ?'" in message and "'what colour is a fig ?'" in message
    assert "layout: implicit prompt checked against a prompt string" in message


# ---------------------------------------------------------------------------------------------- Anthropic hh-rlhf
def hh(*turns: str) -> str:
    """An hh-rlhf transcript: alternating Human / Assistant turns, each after a blank line."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {turn}" for i, turn in enumerate(turns))


HH_HARMLESS = [
    {
        "chosen": hh("what colour is a banana ?", "a banana is yellow ."),
        "rejected": hh("what colour is a banana ?", "go away ."),
    },
    {
        "chosen": hh("hi", "hello , how can i help ?", "what sound does a cow make ?", "i think a cow says moo ."),
        "rejected": hh("hi", "hello , how can i help ?", "what sound does a cow make ?", "i do not care ."),
    },
]
HH_HELPFUL = [
    {"chosen": hh("what is the opposite of hot ?", "cold ."), "rejected": hh("what is the opposite of hot ?", "warm .")}
]


def hh_snapshot(root: Path) -> Path:
    """The repository's layout: one folder per tranche with gzipped train/test JSON Lines, no README configs, and
    a red-team folder of another schema whose file name names no split."""
    for tranche, rows in (("harmless-base", HH_HARMLESS), ("helpful-base", HH_HELPFUL)):
        write_jsonl(root / tranche / "train.jsonl.gz", rows, gz=True)
        write_jsonl(root / tranche / "test.jsonl.gz", rows[:1], gz=True)
    write_jsonl(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": "x", "rating": 0}], gz=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    return root


def test_hh_rlhf_transcripts_cut_as_trl_extract_prompt(run, tokenizer, tmp_path):
    rows, manifest = run(dataset_name=str(hh_snapshot(tmp_path / "hh-rlhf")))
    assert manifest["dataset"]["train"]["format"] == "implicit_prompt_text"
    # The cut falls before the space that precedes the first differing character: both answers start with it.
    prompt = "\n\nHuman: what colour is a banana ?\n\nAssistant:"
    assert_row(
        rows[0], *text_ids(tokenizer, prompt, " a banana is yellow ."), text_ids(tokenizer, prompt, " go away .")[1]
    )
    # A character-level common prefix, as TRL's: the answers' shared first word stays in the prompt.
    prompt = hh("hi", "hello , how can i help ?", "what sound does a cow make ?", "i")
    assert_row(
        rows[1],
        *text_ids(tokenizer, prompt, " think a cow says moo ."),
        text_ids(tokenizer, prompt, " do not care .")[1],
    )
    # Both tranches' train files, harmless-base first (path order), ids counting across them.
    assert sorted(rows) == [0, 1, 2]
    assert (
        rows[2]["prompt_input_ids"] == tokenizer("\n\nHuman: what is the opposite of hot ?\n\nAssistant:")["input_ids"]
    )
    assert manifest["counts"]["eval"]["rows_written"] == 2


# ---------------------------------------------------------------------------------------------- Intel orca_dpo_pairs
ORCA = [
    {
        "system": "You are an AI assistant. Answer briefly.",
        "question": "what colour is a banana ?",
        "chosen": "a banana is yellow .",
        "rejected": "bananas are blue .",
    },
    {
        "system": "",
        "question": "what sound does a cow make ?",
        "chosen": "a cow says moo .",
        "rejected": "ugh , a dog .",
    },
]


def orca_repository(root: Path) -> Path:
    """The repository: one root JSON Lines file whose name names no split, so all of it is the train split."""
    write_jsonl(root / "orca_rlhf.jsonl", ORCA)
    return root


def test_orca_system_column_renders_as_a_system_turn(run, tokenizer, tmp_path):
    rows, manifest = run(
        dataset_name=str(orca_repository(tmp_path / "orca_dpo_pairs")),
        dataset_columns={"question": "prompt", "system": "system"},
    )
    assert manifest["dataset"]["train"]["format"] == "standard_system"
    system = {"role": "system", "content": ORCA[0]["system"]}
    prompt, chosen = chat_ids(tokenizer, [system, user(ORCA[0]["question"])], [assistant(ORCA[0]["chosen"])])
    _, rejected = chat_ids(tokenizer, [system, user(ORCA[0]["question"])], [assistant(ORCA[0]["rejected"])])
    assert_row(rows[0], prompt, chosen, rejected)
    # An empty system string is no system turn at all.
    prompt, chosen = chat_ids(tokenizer, [user(ORCA[1]["question"])], [assistant(ORCA[1]["chosen"])])
    assert (rows[1]["prompt_input_ids"], rows[1]["chosen_input_ids"]) == (prompt, chosen)


def test_orca_system_turn_without_a_chat_template_is_refused(make_config, tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    with pytest.raises(DataError) as exc:
        tokenize_stage(
            make_config(
                dataset_name=str(orca_repository(tmp_path / "orca")),
                model_name_or_path=str(model),
                dataset_columns={"question": "prompt", "system": "system"},
            )
        )
    assert "has no chat template" in one_line(exc) and "drop the system mapping" in str(exc.value)


def test_orca_without_a_mapping_warns_that_a_column_may_be_the_prompt(make_config, tmp_path, caplog):
    # No prompt column: the answers' common start would be the prompt; here they share none, so nothing is left.
    with caplog.at_level(logging.WARNING, logger="pipeline.tokenize"), pytest.raises(DataError, match="no usable"):
        tokenize_stage(make_config(dataset_name=str(orca_repository(tmp_path / "orca"))))
    assert "if one of system, question holds the prompt, map it with dataset_columns: {<column>: prompt}" in (
        caplog.text
    )


# ---------------------------------------------------------------------------------------------- Hub snapshot folders
def ultrafeedback_row(prompt: str, good: str, bad: str) -> dict:
    """A trl-lib/ultrafeedback_binarized row: conversations with an implicit prompt, and the scores."""
    return {
        "chosen": [user(prompt), assistant(good)],
        "rejected": [user(prompt), assistant(bad)],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }


TRL_ROWS = [
    ultrafeedback_row("what colour is a lime ?", "a lime is green .", "a lime is red ."),
    ultrafeedback_row("what do you call a baby cat ?", "a baby cat is a kitten .", "a puppy ."),
]


def test_hub_snapshot_folder_finds_splits_by_file_name(run, tokenizer, tmp_path):
    root = tmp_path / "snapshots" / "0123abc"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", TRL_ROWS)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", TRL_ROWS[:1])
    (root / "README.md").write_text("---\ndataset_info:\n  splits: [train, test]\n---\n")
    rows, manifest = run(dataset_name=str(root))
    assert manifest["dataset"]["train"]["format"] == "implicit_prompt"
    question = [user("what do you call a baby cat ?")]
    prompt, chosen = chat_ids(tokenizer, question, [assistant("a baby cat is a kitten .")])
    _, rejected = chat_ids(tokenizer, question, [assistant("a puppy .")])
    assert_row(rows[1], prompt, chosen, rejected)
    assert manifest["counts"]["eval"]["rows_written"] == 1


def test_shards_of_a_split_are_read_in_order_and_all_hashed(run, make_config, tmp_path):
    root = tmp_path / "sharded"
    write_parquet(root / "data" / "train-00000-of-00002.parquet", TRL_ROWS)
    write_parquet(root / "data" / "train-00001-of-00002.parquet", TRL_ROWS[:1])
    rows, manifest = run(dataset_name=str(root))
    assert sorted(rows) == [0, 1, 2] and rows[2]["prompt_input_ids"] == rows[0]["prompt_input_ids"]
    assert manifest["dataset"]["train"]["source"] == f"{root} [train]"
    before = tokenized_fingerprint(make_config(dataset_name=str(root)))
    write_parquet(root / "data" / "train-00001-of-00002.parquet", TRL_ROWS[1:])  # only the last shard changes
    assert tokenized_fingerprint(make_config(dataset_name=str(root))) != before


@pytest.mark.parametrize(
    "files, expected",
    [
        # push_to_hub's shards: any split name, from the file name (rule 1 wins over the keyword rules).
        (
            ["data/train_prefs-00000-of-00001.parquet", "data/test_prefs-00000-of-00001.parquet", "train.parquet"],
            {
                "train_prefs": ["data/train_prefs-00000-of-00001.parquet"],
                "test_prefs": ["data/test_prefs-00000-of-00001.parquet"],
            },
        ),
        # hh-rlhf: a keyword in the file names, across every folder; red-team names none.
        (
            [
                "helpful-base/train.jsonl.gz",
                "harmless-base/train.jsonl.gz",
                "harmless-base/test.jsonl.gz",
                "red-team-attempts/red_team_attempts.jsonl.gz",
                "README.md",
            ],
            {
                "train": ["harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz"],
                "test": ["harmless-base/test.jsonl.gz"],
            },
        ),
        # Keywords in directory names come first; "dev" is validation.
        (["train/a.jsonl", "dev/b.jsonl", "test.jsonl"], {"train": ["train/a.jsonl"], "validation": ["dev/b.jsonl"]}),
        # '_' separates: a bare train_prefs.parquet is the train split, as in datasets.
        (["train_prefs.parquet", "my_test-1.json"], {"train": ["train_prefs.parquet"], "test": ["my_test-1.json"]}),
        # No keyword: everything is train; hidden, dunder and metadata files are never data.
        (
            ["orca_rlhf.jsonl", ".cache/x.jsonl", "__pycache__/y.json", "dataset_info.json"],
            {"train": ["orca_rlhf.jsonl"]},
        ),
    ],
)
def test_data_files_follow_datasets_split_rules(tmp_path, files, expected):
    import datasets.data_files as df

    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    got = {split: [p.relative_to(tmp_path).as_posix() for p in paths] for split, paths in data_files(tmp_path).items()}
    assert got == expected
    # And datasets itself agrees (its patterns resolved here, split by split, in its order).
    patterns = df.get_data_patterns(str(tmp_path))
    theirs = df.DataFilesDict.from_patterns(patterns, str(tmp_path))
    assert {
        split: [Path(f).relative_to(tmp_path).as_posix() for f in found] for split, found in theirs.items()
    } == expected


def test_save_to_disk_directories_keep_working(run, tokenizer, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ORCA)}).save_to_disk(tmp_path / "saved")
    rows, manifest = run(dataset_name=str(tmp_path / "saved"), dataset_columns={"question": "prompt"})
    assert manifest["dataset"]["train"]["format"] == "standard"
    assert_row(
        rows[0],
        *text_ids(tokenizer, ORCA[0]["question"], ORCA[0]["chosen"]),
        text_ids(tokenizer, ORCA[0]["question"], ORCA[0]["rejected"])[1],
    )


# ---------------------------------------------------------------------------------------------- column mapping
def test_column_mapping_renames_at_once(run, tokenizer, make_config):
    data = Path(make_config().dataset_name) / "train.jsonl"
    first = json.loads(data.read_text().splitlines()[0])
    rows, _ = run(dataset_columns={"prompt": "prompt", "chosen": "rejected", "rejected": "chosen"})
    assert_row(
        rows[0],
        *text_ids(tokenizer, first["prompt"], first["rejected"]),
        text_ids(tokenizer, first["prompt"], first["chosen"])[1],
    )


def test_mapping_a_missing_column_fails_before_any_row(make_config, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ORCA[0]) + "\n{not json\n")  # the second line is never reached
    with pytest.raises(DataError) as exc:
        tokenize_stage(make_config(dataset_name=str(data), dataset_columns={"instruction": "prompt"}))
    assert one_line(exc) == (
        f"{data}: dataset_columns maps column 'instruction', which this split does not have; "
        f"its columns: system, question, chosen, rejected (fix the name in dataset_columns)"
    )
    pq_file = write_parquet(tmp_path / "rows.parquet", ORCA)  # from the Parquet schema
    with pytest.raises(DataError, match=f"{pq_file}: dataset_columns maps column 'instruction'"):
        tokenize_stage(make_config(dataset_name=str(pq_file), dataset_columns={"instruction": "prompt"}))


def test_two_columns_for_one_role_are_refused(make_config):
    with pytest.raises(ConfigError, match="'prompt' and 'chosen' both map to 'prompt'"):
        tokenize_stage(make_config(dataset_columns={"prompt": "prompt", "chosen": "prompt"}))


@pytest.mark.parametrize(
    "rows, columns, expected",
    [
        # A conversational split with a text row: the layout detected and what to change.
        (
            [
                {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
                {"prompt": "hi", "chosen": [assistant("a")], "rejected": [assistant("b")]},
            ],
            None,
            "line 2: field 'prompt' must be a list of {role, content} messages, got str (layout: conversational "
            "(prompt, chosen, rejected message lists), detected from the split's first row; every row needs the layout "
            "of the first row)",
        ),
        (
            [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"question": "p", "chosen": "c", "rejected": "r"}],
            None,
            "line 2: missing field 'prompt' (layout: standard (prompt, chosen, rejected strings), detected from the "
            "split's first row; every row needs 'prompt'; name its column with dataset_columns: {<column>: prompt})",
        ),
        (
            [{"question": "p", "answer": "c"}],
            None,
            "line 1: no known layout: the row has no 'prompt' and no 'chosen' string or message list (its columns: "
            "question, answer); map your columns with dataset_columns",
        ),
        (
            [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], "sys": "x"}],
            {"sys": "system"},
            "line 1: dataset_columns maps a column to 'system', which only a string prompt",
        ),
    ],
)
def test_row_shape_errors_name_the_layout_and_the_fix(make_config, tmp_path, rows, columns, expected):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as exc:
        tokenize_stage(make_config(dataset_name=str(data), dataset_columns=columns))
    assert f"{data} {expected}" in one_line(exc)


# ---------------------------------------------------------------------------------------------- dataset_mixture
STANDARD_EXTRA = [
    {
        "prompt": f"what colour is fruit number {i} ?",
        "chosen": f"fruit {i} is green .",
        "rejected": f"ugh , {i} .",
        "score": float(i),
    }
    for i in range(20)
]


@pytest.fixture
def two_datasets(make_config, tmp_path):
    """The shipped standard rows (a JSONL folder with train/test) and a Parquet snapshot with a score column."""
    write_parquet(tmp_path / "extra" / "data" / "train-00000-of-00001.parquet", STANDARD_EXTRA)
    return Path(make_config().dataset_name), tmp_path / "extra"


def mixture(first: Path, second: Path, **settings) -> dict:
    return {
        "dataset_name": None,
        "dataset_mixture": {
            "datasets": [
                {"id": str(first), "split": "train", "columns": ["prompt", "chosen", "rejected"], "weight": 0.5},
                {"id": str(second), "columns": ["prompt", "chosen", "rejected"], "weight": 0.75},
            ],
            "seed": 7,
            "test_split_size": 0.2,
            **settings,
        },
    }


def test_mixture_takes_the_rows_alignment_handbook_takes(make_config, tokenizer, two_datasets):
    import datasets

    first, second = two_datasets
    out = tokenize_stage(make_config(max_length=1024, max_prompt_length=None, **mixture(first, second)))
    # alignment-handbook's get_dataset on the same data, with datasets' own operations.
    parts = []
    for rows, weight in (
        ([json.loads(line) for line in (first / "train.jsonl").read_text().splitlines()], 0.5),
        (STANDARD_EXTRA, 0.75),
    ):
        ds = datasets.Dataset.from_list(rows).select_columns(["prompt", "chosen", "rejected"])
        parts.append(ds.shuffle(seed=7).select(range(int(len(ds) * weight))))
    expected = datasets.concatenate_datasets(parts).shuffle(seed=7).train_test_split(test_size=0.2, seed=7)
    assert (len(expected["train"]), len(expected["test"])) == (37, 10)  # 32 + 15 rows, ceil(0.2 * 47) held out
    for role, split in (("train", "train"), ("eval", "test")):
        got = load_tokenized(out, role).to_pylist()
        assert [row["example_id"] for row in got] == list(range(len(expected[split])))
        for row, want in zip(got, expected[split], strict=True):
            assert_row(
                row,
                *text_ids(tokenizer, want["prompt"], want["chosen"]),
                text_ids(tokenizer, want["prompt"], want["rejected"])[1],
            )
    manifest = tokenized_manifest(out)
    assert manifest["dataset"]["eval"] == {"source": "dataset_mixture [test]", "split": "test", "format": "standard"}


def test_mixture_fingerprint_is_its_content_and_settings(make_config, two_datasets, tmp_path):
    first, second = two_datasets
    base = tokenized_fingerprint(make_config(**mixture(first, second)))
    copy = shutil.copytree(second, tmp_path / "copy")  # the same content elsewhere: the same artifact
    assert tokenized_fingerprint(make_config(**mixture(first, copy))) == base
    assert tokenized_fingerprint(make_config(**mixture(first, second, seed=8))) != base
    assert tokenized_fingerprint(make_config(**mixture(first, second, test_split_size=3))) != base


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda m: m["datasets"][1].update(weight=0.0),
            ConfigError,
            r"dataset_mixture.datasets\[1\].weight: the fraction of '.*extra' kept must be in \(0, 1\], got 0.0",
        ),
        (lambda m: m["datasets"][0].update(weight=1.5), ConfigError, r"datasets\[0\].weight: .* got 1.5"),
        (
            lambda m: m["datasets"][1].update(split="validation"),
            DataError,
            r"dataset_mixture.datasets\[1\]: '.*extra' has no split 'validation'; its splits: train",
        ),
        (
            lambda m: m["datasets"][0].update(split="train_prefs"),
            DataError,
            r"datasets\[0\]: '.*data' has no split 'train_prefs'; its splits: test, train",
        ),
        (
            lambda m: m["datasets"][1].update(columns=["prompt", "question"]),
            DataError,
            r"dataset_mixture.datasets\[1\].columns: 'question' is not a column of .*extra.*; its columns: prompt, "
            r"chosen, rejected, score",
        ),
        (
            lambda m: m.update(test_split_size=47),
            DataError,
            r"dataset_mixture.test_split_size: 47.0 holds out 47 of the mixture's 47 rows, leaving none to train on",
        ),
        (lambda m: m.update(test_split_size=2.5), ConfigError, r"a row count \(>= 1\) or a fraction in \(0, 1\)"),
        (lambda m: [d.update(weight=0.01) for d in m["datasets"]], DataError, r"the weights keep no row"),
    ],
)
def test_bad_mixtures_are_refused_before_any_work(make_config, two_datasets, change, error, message):
    first, second = two_datasets
    values = mixture(first, second)
    change(values["dataset_mixture"])
    config = make_config(**values)
    with pytest.raises(error, match=message) as exc:
        tokenize_stage(config)
    one_line(exc)
    assert not (config.output_path / "tokenized").exists()


@pytest.mark.parametrize(
    "values, which", [({"dataset_mixture": {"datasets": []}}, "both set"), ({"dataset_name": None}, "both null")]
)
def test_dataset_name_and_dataset_mixture_are_one_or_the_other(make_config, values, which):
    with pytest.raises(ConfigError, match=f"dataset_name, dataset_mixture: {which}; name the data with exactly one"):
        tokenized_fingerprint(make_config(**values))


# ---------------------------------------------------------------------------------------------- dataset_config
def test_dataset_config_reaches_load_dataset(make_config, monkeypatch, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(HH_HELPFUL)}).save_to_disk(tmp_path / "cache")
    calls = []

    def load_dataset(name, config_name=None, **kwargs):  # the Hub, offline: a saved copy of one configuration
        calls.append((name, config_name, kwargs))
        loaded = datasets.load_from_disk(str(tmp_path / "cache"))
        return loaded[kwargs["split"]] if "split" in kwargs else loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tokenized_fingerprint(make_config(dataset_name="Anthropic/hh-rlhf", dataset_config="helpful-base"))
    tokenized_fingerprint(
        make_config(
            dataset_name=None,
            dataset_mixture={"datasets": [{"id": "Anthropic/hh-rlhf", "config": "harmless-base", "split": "train"}]},
        )
    )
    assert calls == [
        ("Anthropic/hh-rlhf", "helpful-base", {}),
        ("Anthropic/hh-rlhf", "harmless-base", {"split": "train"}),
    ]


def test_dataset_config_of_an_unreachable_hub_name(make_config):
    with pytest.raises(DataError) as exc:
        tokenize_stage(make_config(dataset_name="no-such-owner/no-such-dataset", dataset_config="helpful-base"))
    assert (
        "dataset_name 'no-such-owner/no-such-dataset' (configuration 'helpful-base'): not a local path, and "
        "loading it from the Hugging Face Hub failed" in one_line(exc)
    )


def test_a_local_dataset_has_only_the_default_configuration(make_config):
    assert tokenized_fingerprint(make_config(dataset_config="default"))  # datasets' name for it
    with pytest.raises(DataError, match="dataset_config: 'helpful-base' names a configuration, but the local"):
        tokenize_stage(make_config(dataset_config="helpful-base"))


def test_a_named_configuration_of_a_local_copy_is_its_folder(make_config, tmp_path):
    # push_to_hub writes a named configuration's shards into a folder of that name (smoltalk2's "Preference").
    rows = [h4_row(f"what colour is fruit {i} ?", f"fruit {i} is green .", f"{i} ?", i) for i in range(8)]
    write_parquet(tmp_path / "hub" / "Preference" / "tulu_mix-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", rows[:2])  # the default's
    out = tokenize_stage(
        make_config(
            dataset_name=str(tmp_path / "hub"),
            dataset_config="Preference",
            dataset_train_split="tulu_mix",
            dataset_test_split=None,
        )
    )
    assert load_tokenized(out, "train").num_rows == 8


# ---------------------------------------------------------------------------------------------- dataset_num_proc
def test_a_process_pool_writes_the_same_bytes(make_config, tmp_path, monkeypatch):
    import pipeline.tokenize.stage as stage

    # Chat rows, in chunks of 4: 16 tasks for 2 processes, so that order across tasks matters.
    rows = [h4_row(f"what colour is fruit {i} ?", f"fruit {i} is green .", f"{i} ?", i) for i in range(64)]
    write_parquet(tmp_path / "h4" / "data" / "train_prefs-00000-of-00001.parquet", rows)
    monkeypatch.setattr(stage, "_ENCODE_ROWS", 4)
    common = {"dataset_name": str(tmp_path / "h4"), "dataset_train_split": "train_prefs"}
    one = tokenize_stage(make_config(output_dir=str(tmp_path / "one"), **common))
    pool = tokenize_stage(make_config(output_dir=str(tmp_path / "pool"), dataset_num_proc=2, **common))
    assert one.name == pool.name  # dataset_num_proc is not an input of the artifact
    for name in ("train.parquet", "manifest.json"):
        assert (one / name).read_bytes() == (pool / name).read_bytes()


def test_a_process_pool_reports_the_first_bad_row_as_one_process_does(make_config, tmp_path, monkeypatch):
    import pipeline.tokenize.stage as stage

    rows = [h4_row(f"what colour is fruit {i} ?", f"fruit {i} is green .", f"{i} ?", i) for i in range(40)]
    rows[30]["rejected"] = [{"role": "assistant"}]  # read ahead while earlier chunks are still being encoded
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    monkeypatch.setattr(stage, "_ENCODE_ROWS", 4)
    messages = []
    for num_proc in (None, 2):
        with pytest.raises(DataError) as exc:
            tokenize_stage(make_config(dataset_name=str(data), dataset_num_proc=num_proc))
        messages.append(one_line(exc))
    assert messages[0] == messages[1] and f"{data} line 31: field 'rejected' message 0" in messages[0]

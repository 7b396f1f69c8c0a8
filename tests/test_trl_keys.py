"""A TRL user's keys carry over: every key of TRL's, transformers' and alignment-handbook's configs is known,
no-op values are accepted, missing behaviour is refused with its reason, and typos get only close hints."""

import json
import logging
import re
import subprocess
import sys

import pytest
import yaml

from pipeline import trl_keys
from pipeline.cli import override_arguments
from pipeline.config import FIELD_NAMES, REPO_ROOT, field_help, key_disposition, keys_markdown, load_config
from pipeline.errors import ConfigError

INVENTORY = json.loads((REPO_ROOT / "tests" / "data" / "trl_key_inventory.json").read_text())["keys"]


def test_every_key_of_the_public_configs_is_known():
    unknown = [key for key in INVENTORY if key_disposition(key)[0] == "unknown"]
    assert not unknown, f"classify these in pipeline/trl_keys.py: {unknown}"


def test_no_key_has_two_meanings():
    groups = [set(FIELD_NAMES), set(trl_keys.ALIASES), set(trl_keys.NO_EFFECT), set(trl_keys.REFUSED)]
    for i, first in enumerate(groups):
        for second in groups[i + 1 :]:
            assert not first & second, first & second
    assert set(trl_keys.ALIASES.values()) <= set(FIELD_NAMES)


def test_the_docs_table_is_current():
    assert (REPO_ROOT / "docs" / "trl_keys.md").read_text() == keys_markdown(INVENTORY), (
        "regenerate: python -m pipeline.config tests/data/trl_key_inventory.json > docs/trl_keys.md"
    )


def test_every_field_says_what_it_means():
    assert [name for name in FIELD_NAMES if not field_help().get(name)] == []


def test_values_that_change_nothing_are_accepted_and_listed_once(caplog):
    no_ops = {
        "push_to_hub": False,
        "fp16": False,
        "eval_strategy": "no",
        "precompute_ref_log_probs": True,
        "hub_model_id": "zephyr-7b-dpo-full",
        "do_eval": True,
        "overwrite_output_dir": True,
    }
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        config = load_config(None, no_ops)
    assert config.eval_strategy == "no"  # a field: honoured, not ignored
    lines = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(lines) == 1
    assert "6 keys" in lines[0] and all(key in lines[0] for key in no_ops if key != "eval_strategy")


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("push_to_hub", True, "huggingface-cli upload"),
        ("fp16", True, "use bf16"),
        ("fsdp", "full_shard auto_wrap", "write a DeepSpeed ds_config"),
        ("model_adapter_name", "dpo", "trained from scratch (use_peft)"),
        ("rpo_alpha", 1.0, "loss_type: [sigmoid, sft]"),
    ],
)
def test_missing_behaviour_is_refused_with_the_reason_and_the_alternative(key, value, why):
    with pytest.raises(ConfigError, match=rf"{key}: .* is not supported here: .*{re.escape(why)}"):
        load_config(None, {key: value})


@pytest.mark.parametrize(
    "key, not_hinted",
    [
        ("use_peft", "use_weighting"),
        ("lora_dropout", "label_smoothing"),
        ("preprocessing_num_workers", "num_processes"),
    ],
)
def test_a_known_key_of_another_library_is_never_pointed_at_another_field(key, not_hinted):
    try:
        load_config(None, {key: 1})
    except ConfigError as exc:
        assert not_hinted not in str(exc)


def test_typos_get_a_hint_only_for_a_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(None, {"learnig_rate": 1e-5})
    with pytest.raises(ConfigError) as far:
        load_config(None, {"frobnicate": 1})
    assert "did you mean" not in str(far.value) and "dpo-pipeline config" in str(far.value)


def test_old_names_are_renamed_and_may_not_disagree_with_the_new():
    config = load_config(
        None, {"torch_dtype": "bfloat16", "bf16": True, "evaluation_strategy": "steps", "preprocessing_num_workers": 3}
    )
    assert (config.dtype, config.eval_strategy, config.dataset_num_proc) == ("bfloat16", "steps", 3)
    with pytest.raises(ConfigError, match="both 'torch_dtype' and 'dtype' are set"):
        load_config(None, {"torch_dtype": "bfloat16", "dtype": "float32", "bf16": True})
    with pytest.raises(ConfigError, match="dtype: bfloat16 needs bf16: true"):
        load_config(None, {"torch_dtype": "bfloat16"})


def test_trl_command_line_spelling_becomes_overrides():
    argv = [
        "train",
        "--config",
        "c.yaml",
        "--beta",
        "0.1",
        "--bf16",
        "--learning_rate=5e-7",
        "--max_steps",
        "-1",
        "x=1",
        "--output-dir",
        "out",
        "--no_remove_unused_columns",
    ]
    assert override_arguments(argv) == [
        "train",
        "--config",
        "c.yaml",
        "beta=0.1",
        "bf16=true",
        "learning_rate=5e-7",
        "max_steps=-1",
        "x=1",
        "--output-dir",
        "out",
        "remove_unused_columns=false",
    ]


def test_config_command_lists_every_key_and_prints_a_resolved_config(tmp_path):
    listing = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config"], capture_output=True, text=True, check=True
    ).stdout
    assert all(f"\n{name} = " in f"\n{listing}" for name in FIELD_NAMES)
    assert "torch_dtype -> dtype" in listing and "push_to_hub (accepted: false, null)" in listing
    resolved = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "config",
            "--config",
            str(REPO_ROOT / "configs" / "default.yaml"),
            "--beta",
            "0.3",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert yaml.safe_load(resolved)["beta"] == 0.3

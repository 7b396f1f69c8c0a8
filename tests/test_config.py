"""The typed config: TRL field names, overrides, and refusals that name the field."""

import textwrap

import pytest

from pipeline.config import REPO_ROOT, load_config, parse_override
from pipeline.errors import ConfigError
from pipeline.models import resolve_model_dir


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_configs_load():
    default = load_config(REPO_ROOT / "configs" / "default.yaml")
    assert default.sync_ref_model and default.ref_model_sync_steps > 0
    large = load_config(REPO_ROOT / "configs" / "large_model_zero3.yaml")
    assert "zero3" in large.deepspeed


def test_trl_dpo_config_yaml_loads_unchanged(tmp_path):
    # Keys exactly as a TRL DPOConfig YAML spells them.
    cfg = load_config(
        write(
            tmp_path,
            """
        model_name_or_path: Qwen/Qwen2-0.5B-Instruct
        dataset_name: trl-lib/ultrafeedback_binarized
        output_dir: out
        beta: 0.05
        loss_type: [sigmoid, bco_pair, sft]
        loss_weights: [0.8, 0.2, 1.0]
        label_smoothing: 0.1
        f_divergence_type: alpha_divergence
        f_alpha_divergence_coef: 0.5
        reference_free: false
        use_weighting: true
        ld_alpha: 0.5
        discopop_tau: 0.05
        precompute_ref_batch_size: 16
        sync_ref_model: true
        ref_model_mixup_alpha: 0.9
        ref_model_sync_steps: 64
        max_length: 1024
        max_prompt_length: 512
        max_completion_length: 256
        truncation_mode: keep_start
        learning_rate: 5.0e-7
        per_device_train_batch_size: 4
        gradient_accumulation_steps: 8
        num_train_epochs: 1
        max_steps: -1
        seed: 0
        deepspeed: configs/ds_zero3.json
    """,
        )
    )
    assert cfg.loss_types == ("sigmoid", "bco_pair", "sft")
    assert cfg.loss_spec().loss_weights == (0.8, 0.2, 1.0)
    assert cfg.truncation_mode == "keep_start" and cfg.ref_model_mixup_alpha == 0.9


def test_unknown_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'betta'.*did you mean 'beta'"):
        load_config(write(tmp_path, "betta: 0.1\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'learning_rate'"):
        load_config(None, ["learning_rat=0.1"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("beta=0", "beta"),
        ("label_smoothing=0.5", "label_smoothing"),
        ("label_smoothing=-0.1", "label_smoothing"),
        ("max_prompt_length=2048", "max_prompt_length"),
        ("ref_model_sync_steps=0", "ref_model_sync_steps"),
        ("ref_model_mixup_alpha=0", "ref_model_mixup_alpha"),
        ("ref_model_mixup_alpha=1.5", "ref_model_mixup_alpha"),
        ("f_divergence_type=hellinger", "f_divergence_type"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size"),
        ("truncation_mode=middle", "truncation_mode"),
        ("loss_type=sigmoidd", "loss_type"),
    ],
)
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])


def test_sync_ref_model_with_reference_free_is_refused():
    with pytest.raises(ConfigError, match="sync_ref_model"):
        load_config(None, ["sync_ref_model=true", "reference_free=true"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prefix_sharing=true", "padding_free=false"], "prefix_sharing: a shared prompt is a segment of a packed row"),
        (["prefix_sharing=true", "attn_implementation=flash_attention_2"], "cannot take the block mask"),
    ],
)
def test_a_layout_that_cannot_hold_is_refused_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    load_config(None, ["padding_free=false"])  # prefix_sharing null follows padding_free


def test_overrides_parse_as_yaml_and_win_over_the_file(tmp_path):
    cfg = load_config(
        write(tmp_path, "beta: 0.3\nmax_completion_length: 100\n"),
        ["beta=0.2", "loss_type=[sigmoid,ipo]", "loss_weights=[0.5,0.5]", "max_completion_length=null"],
    )
    assert cfg.beta == 0.2 and cfg.loss_types == ("sigmoid", "ipo") and cfg.max_completion_length is None
    assert parse_override("seed=7") == ("seed", 7)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("beta")


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "beta: [\n"))


def test_relative_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["deepspeed=configs/ds_zero2.json"])
    assert cfg.resolve_path(cfg.deepspeed) == REPO_ROOT / "configs" / "ds_zero2.json"
    assert cfg.output_path == tmp_path / "outputs" / "default"


def test_model_dir_refuses_missing_paths_and_unreachable_hub_names(tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        resolve_model_dir(load_config(None, {"model_name_or_path": str(tmp_path / "missing")}))
    # conftest sets HF_HUB_OFFLINE=1: a hub name fails at once with a message that says what was tried.
    with pytest.raises(ConfigError, match="could not be fetched from the Hugging Face Hub"):
        resolve_model_dir(load_config(None, {"model_name_or_path": "nobody/no-such-model"}))


def test_model_dir_uses_an_existing_directory(tiny_model_dir):
    assert resolve_model_dir(load_config(None, {"model_name_or_path": str(tiny_model_dir)})) == tiny_model_dir

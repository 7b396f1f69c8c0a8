"""The public recipes run here as written: each alignment-handbook DPO recipe and TRL's documented ``dpo.py``
configs through ``dpo-pipeline run``, with only the model and dataset ids pointed at local copies and what cannot
exist on this machine switched off (no Hub: ``push_to_hub``; no CUDA: flash-attention). Their trackers run as
written (``report_to``: TensorBoard, wandb offline). The recipes (tests/data/recipes/) are key-for-key listings
of the handbook's files at the commit in each header; the datasets are local copies in the public layouts (a Hub
snapshot's ``data/{split}-00000-of-00001.parquet``, the public columns), built from the shipped sample's rows.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import FIELD_NAMES, REPO_ROOT, load_config
from pipeline.launch import job_environment
from pipeline.metrics import read_summary
from pipeline.plan import Plan

RECIPES = REPO_ROOT / "tests" / "data" / "recipes"
SHIPPED = [json.loads(line) for line in (REPO_ROOT / "data" / "preference" / "train.jsonl").read_text().splitlines()]
SYSTEM = "You are a helpful assistant."


def _messages(row: dict, side: str, system: bool = False) -> list[dict]:
    turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
    return [{"role": "system", "content": SYSTEM}, *turns] if system else turns


def _h4(row: dict, system: bool = False) -> dict:
    """HuggingFaceH4/*_binarized and orca_dpo_pairs: a string prompt, message lists that repeat it."""
    return {
        "prompt": row["prompt"],
        "prompt_id": hashlib.sha256(row["prompt"].encode()).hexdigest(),
        "chosen": _messages(row, "chosen", system),
        "rejected": _messages(row, "rejected", system),
        "messages": _messages(row, "chosen", system),
        "score_chosen": 8.0,
        "score_rejected": 5.0,
    }


LAYOUTS = {  # dataset id -> (its config's directory, row builder, split sizes)
    "HuggingFaceH4/ultrafeedback_binarized": ("data", _h4, {"train_prefs": 2200, "test_prefs": 200}),
    "HuggingFaceH4/cai-conversation-harmless": ("data", _h4, {"train_prefs": 700, "test_prefs": 150}),
    "HuggingFaceH4/orca_dpo_pairs": ("data", lambda r: _h4(r, system=True), {"train_prefs": 600, "test_prefs": 100}),
    "argilla/dpo-mix-7k": (
        "data",
        lambda r: {
            "dataset": "capybara",
            "chosen": _messages(r, "chosen"),
            "rejected": _messages(r, "rejected"),
            "chosen_rating": 5.0,
            "rejected_rating": 2.0,
        },
        {"train": 700, "test": 100},
    ),
    "HuggingFaceTB/smoltalk2": (
        "Preference",
        lambda r: {**_h4(r), "chat_template_kwargs": {"enable_thinking": False}},
        {"llama_3.1_tulu_3_8b_preference_mixture_no_think": 400, "tulu_3_8b_pref_mix_Qwen3_32B_Qwen3_0.6B_think": 400},
    ),
    "trl-lib/ultrafeedback_binarized": (
        "data",
        lambda r: {
            "chosen": _messages(r, "chosen"),
            "rejected": _messages(r, "rejected"),
            "score_chosen": 8.0,
            "score_rejected": 5.0,
        },
        {"train": 2000, "test": 100},
    ),
}


def write_hub_copy(root: Path, dataset_id: str) -> Path:
    """A local copy of ``dataset_id`` as ``snapshot_download`` would lay it out."""
    directory, build, splits = LAYOUTS[dataset_id]
    out = root / dataset_id
    start = 0
    for split, rows in splits.items():
        table = pa.Table.from_pylist([build(row) for row in SHIPPED[start : start + rows]])
        start = (start + rows) % (len(SHIPPED) - max(splits.values()))
        (out / directory).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / directory / f"{split}-00000-of-00001.parquet")
    return out


def localised(recipe: dict, tmp_path: Path, model_dir: Path) -> dict:
    """The recipe with its model and datasets local, its outputs in tmp_path, and what cannot exist here off."""
    out = dict(recipe, model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), push_to_hub=False)
    if recipe.get("attn_implementation") == "flash_attention_2":
        out["attn_implementation"] = None
    if "dataset_mixture" in recipe:
        mixture = recipe["dataset_mixture"]
        out["dataset_mixture"] = {
            **mixture,
            "datasets": [
                {**entry, "id": str(write_hub_copy(tmp_path / "hub", entry["id"]))} for entry in mixture["datasets"]
            ],
        }
    if "dataset_name" in recipe:
        out["dataset_name"] = str(write_hub_copy(tmp_path / "hub", recipe["dataset_name"]))
    return out


def _recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


RUNNABLE = sorted(p.name for p in RECIPES.glob("*.yaml") if "qlora" not in p.name)


@pytest.mark.slow  # each is a whole `dpo-pipeline run` (Prefect API, reference and training jobs): 40-90 s
@pytest.mark.parametrize("name", RUNNABLE)
def test_a_public_recipe_runs_through_the_whole_pipeline(name, tmp_path, tiny_model_dir):
    recipe = localised(_recipe(name), tmp_path, tiny_model_dir)
    config_file = tmp_path / name
    config_file.write_text(yaml.safe_dump(recipe))
    # wandb as on a compute node without network: offline (no API key), its own files in tmp_path.
    wandb = {f"WANDB_{d}_DIR": str(tmp_path / "wandb-home" / d.lower()) for d in ("CONFIG", "CACHE", "DATA")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config_file)],
        env={**job_environment(), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **wandb},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    config = load_config(config_file)
    run_dir = Plan.of(config).train_dir
    summary = read_summary(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # What the recipe asked for is what ran: its logging and evaluation cadence, its loss, its evaluation.
    logged = [r["step"] for r in records if "loss" in r]
    every = recipe.get("logging_steps", 1)
    assert logged == [s for s in range(1, summary["num_steps"] + 1) if s % every == 0 or s == summary["num_steps"]]
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    if recipe.get("eval_strategy") == "no":
        assert evaluated == [] and summary["eval_loss"] is None
    else:
        eval_every = recipe.get("eval_steps") or every
        assert [s for s in evaluated if s % eval_every == 0] == list(
            range(eval_every, summary["num_steps"] + 1, eval_every)
        )
        assert evaluated[-1] == summary["num_steps"]  # and once at the end
    assert summary["train_loss"] is not None and summary["train_loss"] > 0
    trackers = [recipe["report_to"]] if isinstance(recipe.get("report_to"), str) else recipe.get("report_to", [])
    assert any((run_dir / "runs").glob("events.out.tfevents.*")) == ("tensorboard" in trackers)
    assert any((run_dir / "wandb").glob("offline-run-*/run-*.wandb")) == ("wandb" in trackers)
    if config.use_peft:
        assert (run_dir / "final_model" / "adapter_config.json").is_file()
    checkpoints = list((Plan.of(config).train_dir / "checkpoints").glob("step-*"))
    if recipe.get("save_strategy") == "no":
        assert not checkpoints


def test_the_qlora_recipe_is_refused_before_any_work_naming_what_is_missing(tmp_path, tiny_model_dir):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="is not supported here"):
        load_config(None, localised(_recipe("zephyr-7b-beta__dpo__config_qlora.yaml"), tmp_path, tiny_model_dir))


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_runnable_recipe_loads_with_only_paths_changed(name, tmp_path, tiny_model_dir):
    recipe = _recipe(name)
    config = load_config(None, localised(recipe, tmp_path, tiny_model_dir))
    changed = {key for key, value in localised(recipe, tmp_path, tiny_model_dir).items() if recipe.get(key) != value}
    assert changed <= {
        "model_name_or_path",
        "output_dir",
        "push_to_hub",
        "attn_implementation",
        "dataset_mixture",
        "dataset_name",
    }
    # Every key of the recipe that is a field here holds the recipe's value (nothing was dropped or reinterpreted).
    kept = {key: value for key, value in recipe.items() if key in FIELD_NAMES and key not in changed}
    assert {key: getattr(config, key) for key in kept} == kept

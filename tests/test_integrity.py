"""Nothing corrupt or foreign is trusted: byte flips, foreign artifacts, NaN caches, damaged checkpoints.

Each test damages real files the way storage or a person would, then reruns the real stage (in-process, one
DeepSpeed process on the CPU) and compares with an untouched run.
"""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from pipeline.artifacts import MANIFEST, hash_file, write_manifest
from pipeline.config import REPO_ROOT
from pipeline.errors import ArtifactError
from pipeline.plan import Plan
from pipeline.reference.cache import KIND as REFERENCE_KIND
from pipeline.reference.cache import SCHEMA_VERSION as REFERENCE_SCHEMA
from pipeline.reference.stage import reference_stage
from pipeline.tokenize.artifact import tokenized_fingerprint
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train.stage import train_stage

SMALL = dict(
    max_steps=4,
    per_device_train_batch_size=4,
    eval_steps=None,
    save_steps=None,
    deepspeed=str(REPO_ROOT / "configs" / "ds_zero2.json"),
)


def _flip_a_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    where = offset if offset is not None else len(data) // 2
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def _prepared(make_config, out, **overrides):
    config = make_config(output_dir=str(out), **{**SMALL, **overrides})
    tokenize_stage(config)
    return config, reference_stage(config)


def test_a_flipped_byte_in_a_committed_shard_is_recomputed_not_reblessed(make_config, tmp_path):
    config, ref_dir = _prepared(make_config, tmp_path / "out")
    shard = sorted(ref_dir.glob("train-*.parquet"))[0]
    pristine = shard.read_bytes()
    table = pq.read_table(shard)
    # A flip in a value of the first float column: still a readable file with the right ids and finite values.
    values = table.column("ref_chosen_logps").to_numpy().copy()
    values[0] = np.nextafter(values[0], 0, dtype=np.float32)
    tampered = table.set_column(1, "ref_chosen_logps", pa.array(values, pa.float32()))
    pq.write_table(tampered, shard, compression="zstd", use_dictionary=False, write_statistics=False)
    with pytest.raises(ArtifactError, match="does not match the hash"):
        train_stage(config)
    assert reference_stage(config) == ref_dir
    assert shard.read_bytes() == pristine  # recomputed from the model, not kept because it still reads well


def test_a_foreign_tokenized_artifact_with_its_own_manifest_is_refused_by_training(make_config, tmp_path):
    config, _ = _prepared(make_config, tmp_path / "out")
    other = make_config(output_dir=str(tmp_path / "other"), max_length=48)
    foreign = tokenize_stage(other)
    mine = tokenize_stage(config)
    shutil.rmtree(mine)
    shutil.copytree(foreign, mine)  # Parquet files and manifest of another max_length, in this run's place
    with pytest.raises(ArtifactError, match="made from other inputs"):
        train_stage(config)


def test_an_edited_fingerprint_is_refused_by_training(make_config, tmp_path):
    config, _ = _prepared(make_config, tmp_path / "out")
    tokenized = tokenize_stage(config)
    other = tokenize_stage(make_config(output_dir=str(tmp_path / "other"), max_length=48))
    shutil.rmtree(tokenized)
    shutil.copytree(other, tokenized)
    manifest = json.loads((tokenized / MANIFEST).read_text())
    # The foreign artifact now claims to be the expected one; its recorded inputs say otherwise.
    (tokenized / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": tokenized_fingerprint(config)}))
    with pytest.raises(ArtifactError, match="fingerprint"):
        train_stage(config)


def test_a_nan_artifact_with_a_matching_manifest_is_rebuilt_not_stuck(make_config, tmp_path, caplog):
    config, ref_dir = _prepared(make_config, tmp_path / "out")
    shard = sorted(ref_dir.glob("train-*.parquet"))[0]
    pristine = shard.read_bytes()
    table = pq.read_table(shard)
    values = table.column("ref_rejected_logps").to_numpy().copy()
    values[3] = np.nan
    pq.write_table(table.set_column(2, "ref_rejected_logps", pa.array(values, pa.float32())), shard)
    manifest = json.loads((ref_dir / MANIFEST).read_text())
    write_manifest(
        ref_dir,
        kind=REFERENCE_KIND,
        schema_version=REFERENCE_SCHEMA,
        inputs=manifest["inputs"],
        files=manifest["files"],
        counts=manifest["counts"],
        shards=manifest["shards"],
    )
    (shard.parent / f"{shard.name}.sha256").write_text(hash_file(shard) + "\n")  # even the digest agrees
    with pytest.raises(ArtifactError, match="not finite"):
        train_stage(config)
    with caplog.at_level("WARNING"):
        assert reference_stage(config) == ref_dir
    assert any("complete but unusable" in r.message and "rebuilding" in r.message for r in caplog.records)
    assert shard.read_bytes() == pristine
    train_stage(config)  # usable again


def test_a_truncated_complete_checkpoint_falls_back_to_the_previous_one(make_config, tmp_path, caplog):
    weights = {}
    for name in ("uninterrupted", "damaged"):
        config, _ = _prepared(make_config, tmp_path / name, max_steps=6, save_steps=2, save_total_limit=3)
        run_dir = Plan.of(config).train_dir
        if name == "damaged":
            train_stage(config, stop_step=4)  # checkpoints at steps 2 and 4, both with a marker
            newest = run_dir / "checkpoints" / "step-4"
            victim = max((p for p in newest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
            with caplog.at_level("WARNING"):
                train_stage(config)
            assert any(
                "checkpoints/step-4 is damaged" in r.message and victim.name in r.message for r in caplog.records
            )
        else:
            train_stage(config)
        weights[name] = load_file(run_dir / "final_model" / "model.safetensors")
    for key, value in weights["uninterrupted"].items():
        assert (value == weights["damaged"][key]).all(), key


def test_a_flipped_byte_in_a_tr_dpo_window_shard_is_rescored_on_resume(make_config, tmp_path):
    """A TR-DPO run interrupted before its last window's training ends, with a byte of that window's committed
    reference shard flipped meanwhile: the rerun re-scores the window instead of keeping the shard, and ends at
    the weights of the uninterrupted run."""
    config, _ = _prepared(
        make_config, tmp_path / "out", sync_ref_model=True, ref_model_sync_steps=2, max_steps=4, save_steps=2
    )
    run_dir = train_stage(config)
    final = load_file(run_dir / "final_model" / "model.safetensors")
    shard = sorted((run_dir / "windows" / "1" / "reference").glob("train-*.parquet"))[0]
    pristine = shard.read_bytes()
    (run_dir / MANIFEST).unlink()  # as if killed in the last window, after its checkpoint at step 2
    _flip_a_byte(shard, offset=len(pristine) - 200)
    train_stage(config)
    assert shard.read_bytes() == pristine
    again = load_file(run_dir / "final_model" / "model.safetensors")
    assert all((again[k] == final[k]).all() for k in final)

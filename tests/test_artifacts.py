"""Atomic writes and manifests: a reader never trusts a partial, stale or edited artifact."""

import pyarrow as pa
import pytest

from pipeline.artifacts import (
    atomic_path,
    expected_fingerprint,
    fingerprint,
    is_complete,
    model_weights_hash,
    read_manifest,
    write_manifest,
    write_parquet,
)
from pipeline.errors import ArtifactError


def table(n=5):
    return pa.table(
        {
            "example_id": pa.array(range(n), pa.int64()),
            "ids": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
        }
    )


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_parquet_is_byte_identical_across_writes(tmp_path):
    write_parquet(table(), tmp_path / "a.parquet")
    write_parquet(table(), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_manifest_round_trip_and_refusals(tmp_path):
    write_parquet(table(), tmp_path / "data.parquet")
    inputs = {"dataset": "abc", "max_length": 10}
    manifest = write_manifest(
        tmp_path, kind="demo", schema_version=1, inputs=inputs, files=["data.parquet"], counts={"rows": 5}
    )
    assert manifest["fingerprint"] == expected_fingerprint("demo", 1, inputs)
    assert read_manifest(tmp_path, kind="demo", fingerprint=manifest["fingerprint"])["counts"] == {"rows": 5}
    assert is_complete(tmp_path, kind="demo", fingerprint=manifest["fingerprint"])

    with pytest.raises(ArtifactError, match="other inputs"):
        read_manifest(tmp_path, kind="demo", fingerprint=expected_fingerprint("demo", 1, {**inputs, "max_length": 11}))
    with pytest.raises(ArtifactError, match="expected 'other'"):
        read_manifest(tmp_path, kind="other")
    with pytest.raises(ArtifactError, match="schema version"):
        read_manifest(tmp_path, kind="demo", schema_version=2)

    write_parquet(table(6), tmp_path / "data.parquet")  # edited after the manifest was written
    with pytest.raises(ArtifactError, match="does not match the hash"):
        read_manifest(tmp_path, kind="demo")
    assert not is_complete(tmp_path, kind="demo", fingerprint=manifest["fingerprint"])


def test_missing_manifest_means_incomplete(tmp_path):
    write_parquet(table(), tmp_path / "data.parquet")
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        read_manifest(tmp_path, kind="demo")


def test_weights_hash_follows_content(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    first = model_weights_hash(copy)
    assert model_weights_hash(tiny_model_dir) == first  # same content, other path
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_weights_hash(copy) != first  # the remembered hash is keyed on size and mtime, not trusted blindly

"""The reference pass: values against a plain transformers forward, resume, bad input, multi-process ZeRO-3.

Tolerance for log-prob sums: ``rtol=1e-5, atol=1e-5``. The sums are about -50 and fp32 eps is 1.2e-7, so
summation order alone moves them by ~1e-5 absolute; 1e-5 relative (5e-4 absolute) still fails on any real
error such as a one-token shift (several nats).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_small_dataset

from pipeline.artifacts import MANIFEST, read_manifest, write_manifest, write_parquet
from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.errors import ArtifactError, ConfigError, DataError, StorageError
from pipeline.launch import job_environment
from pipeline.layout import BatchLayout
from pipeline.logprobs import reference_pair_logps
from pipeline.plan import Plan
from pipeline.reference import cache
from pipeline.reference import stage as reference_stage_module
from pipeline.reference.stage import compute_reference_logps, reference_stage
from pipeline.tokenize.artifact import load_tokenized
from pipeline.tokenize.stage import tokenize_stage

RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    """One reference pass of the small config (train 64 + eval 32 pairs, ZeRO-3, 1 process)."""
    root = tmp_path_factory.mktemp("reference")
    config = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(write_small_dataset(root / "data")),
            "output_dir": str(root / "out"),
            "max_length": 64,
            "max_prompt_length": 32,
            "precompute_ref_batch_size": 8,
        },
    )
    tokenized_dir = tokenize_stage(config)
    return config, tokenized_dir, reference_stage(config)


def _plain_logps(model, prompt: list[int], completion: list[int]) -> tuple[float, float]:
    """Sum of completion-token log-probs, the obvious way: one unpadded sequence, full log_softmax."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt)
    token_logps = logps[start - 1 : -1].gather(-1, ids[0, start:, None]).squeeze(-1)
    return float(token_logps.sum()), token_logps


def test_values_match_a_plain_transformers_forward(scored, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, tokenized_dir, ref_dir = scored
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for split, every in (("eval", 1), ("train", 4)):  # every eval pair, every 4th train pair: ~5 s
        all_rows = load_tokenized(tokenized_dir, split).to_pylist()
        everything = cache.load_reference_logps(ref_dir, split=split, expected_ids=[r["example_id"] for r in all_rows])
        assert everything.example_ids.tolist() == [r["example_id"] for r in all_rows]  # example_id order
        rows = all_rows[::every]
        got = reference_pair_logps(everything.take([r["example_id"] for r in rows]))
        expected = {name: [] for name in ("chosen", "rejected", "chosen_public", "rejected_public")}
        for row in rows:
            public = min(row["chosen_length"], row["rejected_length"])
            for side in ("chosen", "rejected"):
                total, tokens = _plain_logps(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
                expected[side].append(total)
                expected[f"{side}_public"].append(float(tokens[:public].sum()))
        for name, values in expected.items():
            torch.testing.assert_close(
                getattr(got, name),
                torch.tensor(values),
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, where=f"{split} {name}": f"{where}: {m}",
            )
        assert everything.chosen.dtype == np.float32
        assert got.chosen_lengths.tolist() == [r["chosen_length"] for r in rows]
        assert got.rejected_lengths.tolist() == [r["rejected_length"] for r in rows]
        # Completions that differ in length make the public (LD-DPO) sum a strict part of the longer one.
        assert any(r["chosen_length"] != r["rejected_length"] for r in rows)


def test_padded_rows_and_packed_rows_with_a_shared_prompt_score_the_same(scored, tmp_path):
    """The default layout (packed rows, the prompt computed once per pair) against padded rows: one artifact's
    values, to float rounding, so the layout is no input of the reference fingerprint."""
    config, _, ref_dir = scored
    assert BatchLayout.of(config) == BatchLayout(padding_free=True, prefix_sharing=True, max_packed_tokens=128)
    padded = config.model_copy(update={"output_dir": str(tmp_path / "out"), "padding_free": False})
    tokenize_stage(padded)
    out = reference_stage(padded)
    assert out.name == ref_dir.name
    for split in ("train", "eval"):
        shared, rows = _values(ref_dir, split), _values(out, split)
        assert np.array_equal(shared["example_id"], rows["example_id"])
        for name in cache.VALUE_COLUMNS:
            np.testing.assert_allclose(shared[name], rows[name], rtol=1e-5, atol=1e-5, err_msg=f"{split} {name}")


def test_a_pair_longer_than_a_packed_row_is_refused_before_any_model_is_loaded(scored, tmp_path, monkeypatch):
    config, tokenized_dir, _ = scored
    longest = max(
        r["prompt_length"] + r["chosen_length"] + r["rejected_length"]
        for r in load_tokenized(tokenized_dir, "train").to_pylist()
    )
    small = config.model_copy(update={"output_dir": str(tmp_path / "out"), "max_packed_tokens": longest - 1})
    tokenize_stage(small)
    monkeypatch.setattr(reference_stage_module, "_load_engine", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(
        ConfigError,
        match=rf"max_packed_tokens: the tokenized train split: example_id \d+ takes "
        rf"{longest} tokens.*raise max_packed_tokens to at least {longest}",
    ):
        reference_stage(small)


def test_reference_rows_come_in_the_requested_order(scored):
    _, _, ref_dir = scored
    logps = cache.load_reference_logps(ref_dir, split="train")
    pairs = reference_pair_logps(logps.take([7, 2]))
    assert pairs.chosen.tolist() == [logps.chosen[7], logps.chosen[2]]
    assert pairs.rejected_public.dtype == torch.float32 and pairs.chosen_lengths.tolist() == [
        float(logps.chosen_lengths[7]),
        float(logps.chosen_lengths[2]),
    ]
    with pytest.raises(ArtifactError, match=r"no example_id \[100000\]"):
        logps.take([1, 100000])


def test_rerun_of_a_complete_artifact_does_no_model_work(scored, monkeypatch):
    config, _, ref_dir = scored
    manifest = (ref_dir / MANIFEST).read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a complete artifact")

    monkeypatch.setattr(reference_stage_module, "_load_engine", no_model)
    assert reference_stage(config) == ref_dir == Plan.of(config).reference_dir
    assert (ref_dir / MANIFEST).read_bytes() == manifest
    counts = json.loads(manifest)["counts"]
    assert counts["examples_by_split"] == {"train": 64, "eval": 32}
    assert cache.reference_forward_count(ref_dir) == 96
    # Inputs that change values change the directory; batch size does not.
    assert Plan.of(config.model_copy(update={"bf16": True})).reference_dir != ref_dir
    assert Plan.of(config.model_copy(update={"precompute_ref_batch_size": 3})).reference_dir == ref_dir


def test_subset_of_ids_with_extra_inputs_and_a_zero2_config(scored, tmp_path):
    """TR-DPO's call: some train ids and a window number. ZeRO-2 configs run the pass with replicated weights."""
    config, tokenized_dir, ref_dir = scored
    config = config.model_copy(update={"deepspeed": str(REPO_ROOT / "configs" / "ds_zero2.json")})
    model_dir = Path(config.model_name_or_path)
    out = compute_reference_logps(
        config,
        tokenized_dir=tokenized_dir,
        model_dir=model_dir,
        out_dir=tmp_path / "w1",
        splits=["train"],
        example_ids={"train": [9, 1, 5]},
        extra_inputs={"window": 1},
    )
    window = cache.load_reference_logps(out, split="train", expected_ids=[1, 5, 9])
    full = cache.load_reference_logps(ref_dir, split="train")
    np.testing.assert_allclose(window.chosen, full.chosen[[1, 5, 9]], rtol=RTOL, atol=ATOL)
    assert cache.reference_forward_count(out) == 3
    manifest = read_manifest(out, kind=cache.KIND)
    assert manifest["inputs"]["extra"] == {"window": 1} and list(manifest["shards"]) == ["train"]
    with pytest.raises(ArtifactError, match="made from other inputs"):
        cache.load_reference_logps(
            out, split="train", fingerprint=read_manifest(ref_dir, kind=cache.KIND)["fingerprint"]
        )


def test_tr_dpo_stage_scores_only_the_eval_split(scored):
    config, _, ref_dir = scored
    out = reference_stage(config.model_copy(update={"sync_ref_model": True}))
    assert out != ref_dir
    assert list(read_manifest(out, kind=cache.KIND)["shards"]) == ["eval"]


@pytest.mark.parametrize(
    "ids, message",
    [([3, 3, 4], r"must be unique; repeated: \[3\]"), ([1, 9999], r"not in the tokenized artifact .* \[9999\]")],
)
def test_bad_subset_ids_are_refused(scored, tmp_path, ids, message):
    config, tokenized_dir, _ = scored
    with pytest.raises(DataError, match=message):
        compute_reference_logps(
            config,
            tokenized_dir=tokenized_dir,
            model_dir=Path(config.model_name_or_path),
            out_dir=tmp_path / "out",
            splits=["train"],
            example_ids={"train": ids},
        )


# ------------------------------------------------------------------------------------------------ the reader
def _recommit(src: Path, dst: Path, edit) -> Path:
    """A copy of the artifact whose first train shard is ``edit(table)``, committed with a valid manifest."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst, kind=cache.KIND)
    shard = dst / manifest["shards"]["train"][0]
    write_parquet(edit(pq.read_table(shard)), shard)
    extra = {
        k: v
        for k, v in manifest.items()
        if k not in ("kind", "schema_version", "fingerprint", "inputs", "files", "counts")
    }
    write_manifest(
        dst,
        kind=cache.KIND,
        schema_version=cache.SCHEMA_VERSION,
        inputs=manifest["inputs"],
        files=manifest["files"],
        counts=manifest["counts"],
        **extra,
    )
    return dst


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(
        table.schema.get_field_index(name),
        table.schema.field(name),
        pa.array(values, type=table.schema.field(name).type),
    )


def test_reader_refuses_bad_artifacts(scored, tmp_path):
    _, _, ref_dir = scored
    ids = cache.load_reference_logps(ref_dir, split="train").example_ids.tolist()
    with pytest.raises(ArtifactError, match=r"2 expected example_ids are missing, e\.g\. \[1000, 1001\]"):
        cache.load_reference_logps(ref_dir, split="train", expected_ids=ids + [1000, 1001])
    with pytest.raises(ArtifactError, match=r"1 example_ids are not expected, e\.g\. \[0\]"):
        cache.load_reference_logps(ref_dir, split="train", expected_ids=ids[1:])
    with pytest.raises(ArtifactError, match="made from other inputs"):
        cache.load_reference_logps(ref_dir, split="train", fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="has no test split"):
        cache.load_reference_logps(ref_dir, split="test")

    nan = _recommit(
        ref_dir,
        tmp_path / "nan",
        lambda t: _set(t, "ref_rejected_logps", [np.nan] + t.column("ref_rejected_logps").to_pylist()[1:]),
    )
    with pytest.raises(ArtifactError, match=r"ref_rejected_logps is not finite for example_id \[0\]"):
        cache.load_reference_logps(nan, split="train")
    dup = _recommit(ref_dir, tmp_path / "dup", lambda t: _set(t, "example_id", [0, 0] + ids[2:]))
    with pytest.raises(ArtifactError, match=r"example_id \[0\] appears more than once"):
        cache.load_reference_logps(dup, split="train")

    edited = tmp_path / "edited"
    shutil.copytree(ref_dir, edited)
    shard = edited / "train-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(_set(table, "ref_chosen_logps", np.zeros(table.num_rows, np.float32)), shard)
    with pytest.raises(ArtifactError, match="train-00000.parquet does not match the hash"):
        cache.load_reference_logps(edited, split="train")


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_model_and_missing_tokenized_artifact(scored, tmp_path):
    config, tokenized_dir, _ = scored
    with pytest.raises(ConfigError, match=f"reference model directory not found: {tmp_path / 'nope'}"):
        compute_reference_logps(
            config, tokenized_dir=tokenized_dir, model_dir=tmp_path / "nope", out_dir=tmp_path / "out", splits=["train"]
        )
    with pytest.raises(ConfigError, match="model directory not found"):
        reference_stage(config.model_copy(update={"model_name_or_path": str(tmp_path / "nope")}))
    with pytest.raises(ArtifactError, match="run the tokenize stage first"):
        reference_stage(config.model_copy(update={"output_dir": str(tmp_path / "fresh")}))


def test_token_ids_outside_the_model_vocabulary_are_refused_before_any_forward(scored, tmp_path, monkeypatch):
    config, tokenized_dir, _ = scored
    small_vocab = shutil.copytree(config.model_name_or_path, tmp_path / "small-vocab")
    model_config = json.loads((small_vocab / "config.json").read_text())
    (small_vocab / "config.json").write_text(json.dumps({**model_config, "vocab_size": 300}))
    monkeypatch.setattr(
        reference_stage_module, "_load_engine", lambda *a: pytest.fail("model loaded before the vocabulary check")
    )
    first = load_tokenized(tokenized_dir, "train").to_pylist()
    culprit = next(
        r for r in first if max(r["prompt_input_ids"] + r["chosen_input_ids"] + r["rejected_input_ids"]) >= 300
    )
    with pytest.raises(
        DataError,
        match=rf"{tokenized_dir}, split train, example_id {culprit['example_id']}: .* "
        rf"outside the reference model's vocabulary of 300",
    ):
        compute_reference_logps(
            config, tokenized_dir=tokenized_dir, model_dir=small_vocab, out_dir=tmp_path / "out", splits=["train"]
        )


def test_tokenized_parquet_that_does_not_match_its_manifest_is_refused(scored, tmp_path):
    config, tokenized_dir, _ = scored
    copy = shutil.copytree(tokenized_dir, tmp_path / "tokenized")
    table = pq.read_table(copy / "train.parquet")
    write_parquet(table.slice(1), copy / "train.parquet")  # a row dropped after the manifest was written
    with pytest.raises(ArtifactError, match="train.parquet does not match the hash in manifest.json"):
        compute_reference_logps(
            config,
            tokenized_dir=copy,
            model_dir=Path(config.model_name_or_path),
            out_dir=tmp_path / "out",
            splits=["train"],
        )


# ------------------------------------------------------------------------------------------------ failures, resume
def _values(ref_dir: Path, split: str = "train") -> dict[str, np.ndarray]:
    table = pa.concat_tables(
        pq.read_table(ref_dir / name).replace_schema_metadata(None)
        for name in read_manifest(ref_dir, kind=cache.KIND)["shards"][split]
    )
    return {name: table.column(name).to_numpy() for name in table.column_names}


def test_writer_failing_mid_way_leaves_no_shard_a_reader_accepts(scored, tmp_path, monkeypatch):
    config, tokenized_dir, ref_dir = scored
    out = tmp_path / "out"
    kwargs = dict(
        tokenized_dir=tokenized_dir,
        model_dir=Path(config.model_name_or_path),
        out_dir=out,
        splits=["train"],
        shard_size=16,
    )
    real_write_table, calls = pq.write_table, []

    def disk_full_on_second_shard(table, where, **options):
        calls.append(where)
        if len(calls) == 2:
            real_write_table(table, where, **options)
            Path(where).write_bytes(Path(where).read_bytes()[:100])  # half-written, then the disk is full
            raise OSError(28, "No space left on device")
        real_write_table(table, where, **options)

    monkeypatch.setattr(pq, "write_table", disk_full_on_second_shard)
    with pytest.raises(StorageError, match=r"cannot write .*train-00001.parquet: no space left on"):
        compute_reference_logps(config, **kwargs)
    # No temporary file, no manifest: the first shard and the digest it was committed with.
    assert sorted(p.name for p in out.iterdir()) == ["train-00000.parquet", "train-00000.parquet.sha256"]
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        cache.load_reference_logps(out, split="train")

    monkeypatch.setattr(pq, "write_table", real_write_table)
    (out / "train-00002.parquet").write_bytes(b"PAR1 a partial copy")  # not written by us: must be recomputed
    compute_reference_logps(config, **kwargs)
    counts = read_manifest(out, kind=cache.KIND)["counts"]
    assert (counts["shards"], counts["reused_shards"]) == (4, 1)
    resumed, whole = _values(out), _values(ref_dir)
    for name, values in whole.items():
        np.testing.assert_allclose(resumed[name], values, rtol=RTOL, atol=ATOL, err_msg=name)


_HANG_AFTER_FIRST_SHARD = """
import sys, time
from pathlib import Path
from pipeline.reference import stage
from pipeline.config import load_config
write_shard = stage.write_shard
def write_then_hang(out_dir, shard, *args):
    write_shard(out_dir, shard, *args)
    Path(sys.argv[3]).touch()
    time.sleep(600)
stage.write_shard = write_then_hang
stage.compute_reference_logps(load_config(sys.argv[1]), tokenized_dir=Path(sys.argv[2]), model_dir=Path(sys.argv[4]),
                              out_dir=Path(sys.argv[5]), splits=["train", "eval"], shard_size=16)
"""


@pytest.mark.slow  # a child process that imports DeepSpeed: 15-30 s here
def test_sigkill_after_the_first_shard_then_rerun_gives_the_uninterrupted_artifact(scored, tmp_path):
    config, tokenized_dir, _ = scored
    config_path, committed, out = tmp_path / "cfg.yaml", tmp_path / "first-shard-committed", tmp_path / "killed"
    save_config(config, config_path)
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _HANG_AFTER_FIRST_SHARD,
                str(config_path),
                str(tokenized_dir),
                str(committed),
                config.model_name_or_path,
                str(out),
            ],
            env=job_environment(),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not committed.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the child committed no shard within 120 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out / "train-00000.parquet").is_file() and not (out / MANIFEST).exists()

    kwargs = dict(
        tokenized_dir=tokenized_dir, model_dir=Path(config.model_name_or_path), splits=["train", "eval"], shard_size=16
    )
    compute_reference_logps(config, out_dir=out, **kwargs)
    compute_reference_logps(config, out_dir=tmp_path / "uninterrupted", **kwargs)
    resumed = read_manifest(out, kind=cache.KIND)
    whole = read_manifest(tmp_path / "uninterrupted", kind=cache.KIND)
    assert resumed["counts"]["reused_shards"] == 1 and whole["counts"]["reused_shards"] == 0
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert resumed["files"] == whole["files"]  # byte-identical shards
    assert not list(out.glob(".tmp-*"))


def test_bf16_model_accumulates_in_float32(scored, tmp_path):
    config, tokenized_dir, ref_dir = scored
    out = compute_reference_logps(
        config.model_copy(update={"bf16": True}),
        tokenized_dir=tokenized_dir,
        model_dir=Path(config.model_name_or_path),
        out_dir=tmp_path / "bf16",
        splits=["eval"],
        example_ids={"eval": list(range(8))},
    )
    bf16 = cache.load_reference_logps(out, split="eval")
    fp32 = cache.load_reference_logps(ref_dir, split="eval")
    assert bf16.chosen.dtype == np.float32
    assert read_manifest(out, kind=cache.KIND)["inputs"]["dtype"] == "bfloat16"
    # bf16 weights and activations: ~3 significant digits per token; the sums still agree to about 2%.
    np.testing.assert_allclose(bf16.chosen, fp32.chosen[:8], rtol=2e-2)
    assert not np.array_equal(bf16.chosen, fp32.chosen[:8])


# ------------------------------------------------------------------------------------------------ multi-process
@pytest.mark.slow
def test_two_process_zero3_through_the_launcher_matches_one_process(scored, tmp_path):
    config, _, ref_dir = scored
    # Batch 5: 13 train and 7 eval batches, so one rank runs out first and must repeat a batch to stay in step.
    two = config.model_copy(update={"output_dir": str(tmp_path / "out"), "precompute_ref_batch_size": 5})
    tokenize_stage(two)
    config_path = tmp_path / "cfg.yaml"
    save_config(two, config_path)
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dpo-pipeline"),
            "reference",
            "--config",
            str(config_path),
            "num_processes=2",
            f"deepspeed={REPO_ROOT / 'configs' / 'ds_zero3.json'}",
        ],
        env=job_environment(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = Plan.of(two).reference_dir
    assert out.name == ref_dir.name  # same inputs, same fingerprint
    manifest = read_manifest(out, kind=cache.KIND)
    assert manifest["world_size"] == 2 and manifest["counts"]["forwards"] == 2 * (7 + 4)
    for split in ("train", "eval"):
        one, both = _values(ref_dir, split), _values(out, split)
        assert np.array_equal(both["example_id"], one["example_id"])
        for name in cache.VALUE_COLUMNS:
            np.testing.assert_allclose(both[name], one[name], rtol=RTOL, atol=ATOL, err_msg=f"{split} {name}")

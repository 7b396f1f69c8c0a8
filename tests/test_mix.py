"""The streaming safetensors mix (pipeline/train/mix.py), TR-DPO's export and audit tool: equal to TRL's in-memory
sync bit for bit, any sharding and dtype, refusals of mismatched or broken files, constant memory."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import REPO_ROOT
from pipeline.errors import ArtifactError
from pipeline.train import mix


def _llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def _trl_mix(reference, policy, alpha):
    """TRL's SyncRefModelCallback._sync_target_model on copies: the in-memory update we must reproduce."""
    target = copy.deepcopy(reference)
    for target_param, copy_param in zip(target.parameters(), policy.parameters(), strict=True):
        target_param.data.mul_(1.0 - alpha).add_(copy_param.data.to(target_param.dtype), alpha=alpha)
    return target


def test_mix_equals_trl_in_memory_sync_with_a_sharded_bf16_policy(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(mix, "MIX_CHUNK_BYTES", 4096)  # many chunks per tensor: exercises the chunk seams
    reference, policy = _llama(0), _llama(1, torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref")
    policy.save_pretrained(tmp_path / "policy", max_shard_size="20KB")
    assert len(mix.safetensors_files(tmp_path / "policy")) > 1

    stats = mix.mix_safetensors(tmp_path / "ref", tmp_path / "policy", tmp_path / "out", 0.6)

    mixed = load_file(tmp_path / "out" / "model.safetensors")
    for name, param in _trl_mix(reference, policy.float(), 0.6).named_parameters():
        assert mixed[name].dtype == torch.float32 and torch.equal(mixed[name], param.detach()), name
    # Same layout as the reference: its header byte for byte, then the tensors' bytes.
    header = (tmp_path / "ref" / "model.safetensors").read_bytes()[:200]
    assert (tmp_path / "out" / "model.safetensors").read_bytes()[:200] == header
    assert stats["model_bytes"] == (tmp_path / "ref" / "model.safetensors").stat().st_size
    assert stats["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert stats["tensors"] == len(mixed)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable Hugging Face model directory


def test_a_bf16_sharded_reference_stays_bf16_and_sharded_and_alpha_one_copies_the_policy(tmp_path):
    _llama(0, torch.bfloat16).save_pretrained(tmp_path / "ref", max_shard_size="20KB")
    _llama(1).save_pretrained(tmp_path / "policy")
    reference = {}
    for name in mix.safetensors_files(tmp_path / "ref"):
        reference.update(load_file(tmp_path / "ref" / name))
    policy = load_file(tmp_path / "policy" / "model.safetensors")

    for alpha in (0.25, 1.0):
        out = tmp_path / f"out-{alpha}"
        stats = mix.mix_safetensors(tmp_path / "ref", tmp_path / "policy", out, alpha)
        assert mix.SAFETENSORS_INDEX in stats["files"]
        mixed = {}
        for name in mix.safetensors_files(out):
            mixed.update(load_file(out / name))
        for name, tensor in reference.items():
            expected = (tensor.float() * (1 - alpha) + alpha * policy[name]).to(torch.bfloat16)
            assert mixed[name].dtype == torch.bfloat16 and torch.equal(mixed[name], expected), name
    assert all(torch.equal(mixed[n], policy[n].to(torch.bfloat16)) for n in policy)


def test_mix_refuses_mismatched_or_broken_checkpoints(tmp_path):
    reference = {"a": torch.ones(4, 3), "b": torch.zeros(5)}
    save_file(reference, tmp_path / "model.safetensors")
    (tmp_path / "ref").mkdir()
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "ref")

    def policy(name: str, tensors: dict) -> Path:
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        return tmp_path / name

    def run_mix(policy_dir: Path, alpha: float = 0.5):
        return mix.mix_safetensors(tmp_path / "ref", policy_dir, tmp_path / "out", alpha)

    with pytest.raises(
        ArtifactError,
        match=r"different tensors \(missing from the policy: \['b'\], only in the "
        r"policy: \['c'\]\)",
    ):
        run_mix(policy("renamed", {"a": torch.ones(4, 3), "c": torch.zeros(5)}))
    with pytest.raises(ArtifactError, match=r"tensor a: policy shape \[3, 4\] != reference shape \[4, 3\]"):
        run_mix(policy("reshaped", {"a": torch.ones(3, 4), "b": torch.zeros(5)}))
    truncated = policy("truncated", reference)
    data_file = truncated / "model.safetensors"
    data_file.write_bytes(data_file.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="truncated or has trailing bytes"):
        run_mix(truncated)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        run_mix(tmp_path / "garbage")
    (tmp_path / "bin-only").mkdir()
    torch.save(reference, tmp_path / "bin-only" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="no safetensors weights in .*bin-only"):
        run_mix(tmp_path / "bin-only")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        run_mix(policy("fine", reference), alpha=0.0)
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing was committed by a failed mix


_MEASURE_MIX = """
import json, sys
from pathlib import Path
from pipeline.train.mix import mix_safetensors
print(json.dumps(mix_safetensors(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), 0.6)))
"""


@pytest.mark.slow
def test_mix_peak_memory_is_a_few_chunks_not_a_model(tmp_path):
    """A ~300 MB Llama-shaped checkpoint, mixed in a fresh process: peak RSS above its start < 1/4 model."""
    hidden, vocab, layers = 1024, 16000, 4
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        for name, shape in {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (hidden // 2, hidden),
            "self_attn.v_proj": (hidden // 2, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (2816, hidden),
            "mlp.up_proj": (2816, hidden),
            "mlp.down_proj": (hidden, 2816),
        }.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    for side in ("ref", "policy"):
        (tmp_path / side).mkdir()
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        save_file(tensors, tmp_path / side / "model.safetensors", metadata={"format": "pt"})
        del tensors
    model_bytes = (tmp_path / "ref" / "model.safetensors").stat().st_size
    assert model_bytes > 250 << 20

    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_MIX, str(tmp_path / "ref"), str(tmp_path / "policy"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["model_bytes"] == model_bytes
    assert 0 < stats["peak_rss_delta_bytes"] < model_bytes / 4, stats
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == model_bytes

"""pipeline.throughput: FLOP counts of a real tiny Llama (plain, tied, GQA, LoRA, ZeRO-3 partitioned) against
hand counts and torch's FlopCounterMode, the peak table's lookups, the CPU peak, and the step arithmetic."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import throughput
from pipeline.config import REPO_ROOT
from pipeline.logprobs import collate_pairs, pack_pairs
from pipeline.throughput import ModelFlops, StepThroughput, peak_flops, table_peak

D, F, LAYERS, HEADS, VOCAB = 64, 128, 2, 4, 256
T, B = 32, 2  # the fixed sequence length and batch of the FlopCounterMode runs


def llama_config(kv_heads=HEADS, tied=False):
    from transformers import LlamaConfig

    # eager attention: FlopCounterMode counts its matmuls; the CPU SDPA kernel is not one it knows (counts 0).
    return LlamaConfig(
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )


def llama(**kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(**kwargs))


def lora(model, targets, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def counted(model, logits_to_keep=0, backward=True):
    """FlopCounterMode's FLOPs per token of one forward (+ backward) at B x T."""
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        logits = model(input_ids=ids, logits_to_keep=logits_to_keep).logits
        if backward:
            logits.float().sum().backward()
    return counter.get_total_flops() / (B * T)


# ------------------------------------------------------------------------------------- counts by hand
@pytest.mark.parametrize("kv_heads,tied", [(HEADS, False), (2, True)])
def test_counts_match_the_config_by_hand(kv_heads, tied):
    head_dim = D // HEADS
    attention = 2 * D * D + 2 * D * kv_heads * head_dim  # q, o: d x d; k, v: d x (kv heads x head dim)
    layer_matrices = attention + 3 * D * F  # + gate, up, down
    norms = LAYERS * 2 * D + D
    flops = ModelFlops.of(llama(kv_heads=kv_heads, tied=tied))
    assert flops.total_params == VOCAB * D * (1 if tied else 2) + LAYERS * layer_matrices + norms
    assert flops.trainable_params == flops.total_params
    # The input table is a lookup; the lm_head is a V x d matmul, tied or not.
    assert flops.non_embedding_params == flops.trainable_non_embedding_params == LAYERS * layer_matrices + VOCAB * D
    assert (flops.lm_head_params, flops.lm_head_trainable) == (VOCAB * D, True)
    assert (flops.num_layers, flops.hidden_size, flops.attention_width) == (LAYERS, D, HEADS * head_dim)
    n, s = flops.non_embedding_params, 100.0
    assert flops.train_flops_per_token(s) == 6 * n + 12 * LAYERS * D * s  # PaLM's 6N + 12 L d s
    assert flops.forward_flops_per_token(s) == 2 * n + 4 * LAYERS * D * s


def test_lora_counts_only_adapters_as_trainable():
    base = ModelFlops.of(llama())
    model = lora(llama(), ["q_proj", "v_proj"])
    flops = ModelFlops.of(model)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert adapters == LAYERS * 2 * (4 * D + D * 4)  # q and v: A (r x d) + B (d x r) per layer
    assert flops.trainable_params == flops.trainable_non_embedding_params == adapters
    assert flops.total_params == base.total_params + adapters
    assert flops.non_embedding_params == base.non_embedding_params + adapters
    assert not flops.lm_head_trainable
    s = 50.0
    # 4N (forward and input gradients, adapters included) + 2 N_lora (weight gradients) + attention.
    assert flops.train_flops_per_token(s) == 4 * flops.non_embedding_params + 2 * adapters + 12 * LAYERS * D * s


# --------------------------------------------------------------------------------- FlopCounterMode
@pytest.mark.parametrize("kv_heads,tied", [(HEADS, False), (2, True)])
def test_full_fine_tune_matches_flop_counter_exactly(kv_heads, tied):
    """Tolerance 0: 2N counts exactly the matmuls (norms, biases and the lookup are not FlopCounter ops either),
    and the attention term counts QK^T and AV over the full context, as FlopCounterMode does (no causal
    halving); 12LAs is its forward plus twice that in backward."""
    model = llama(kv_heads=kv_heads, tied=tied)
    flops = ModelFlops.of(model)
    assert counted(model) == pytest.approx(flops.train_flops_per_token(T), rel=1e-12)
    assert counted(model, backward=False) == pytest.approx(flops.forward_flops_per_token(T), rel=1e-12)
    # logits_to_keep (as the recipe's completion_logps): the lm_head runs on the kept positions only.
    kept = 8
    assert counted(model, logits_to_keep=kept) == pytest.approx(flops.train_flops_per_token(T, kept / T), rel=1e-12)


@pytest.mark.parametrize(
    "targets,modules_to_save",
    [(["q_proj", "v_proj"], None), ("all-linear", None), (["q_proj", "v_proj"], ["embed_tokens", "lm_head"])],
)
def test_lora_matches_flop_counter_within_ten_percent(targets, modules_to_save):
    """The formula assumes every matmul's input gradient is computed; autograd skips those below the lowest
    trainable weight: in layer 0 (whose input, the frozen embedding's output, needs no gradient) the base
    q/k/v projections' and the adapters' A input gradients, and without a k adapter the gradient of K in QK^T.
    That is the whole gap: 6.5 % at 2 layers, O(1/layers) of it at real depth. With a trained embedding
    (modules_to_save, whose frozen originals do not run and are not counted) there is none."""
    model = lora(llama(), targets, modules_to_save)
    flops = ModelFlops.of(model)
    measured, formula = counted(model), flops.train_flops_per_token(T)
    r, head_dim = 4, D // HEADS
    skipped = 2 * 3 * D * D  # layer 0's frozen q, k, v: 2 FLOPs per weight for the input gradient
    adapted = ["q_proj", "v_proj"] if targets != "all-linear" else ["q_proj", "k_proj", "v_proj"]
    skipped += len(adapted) * 2 * r * D  # layer 0's A (r x d) input gradients on those inputs
    if "k_proj" not in adapted:
        skipped += 2 * HEADS * head_dim * T  # K needs no gradient in layer 0: half of QK^T's backward
    if modules_to_save:
        skipped = 0
        assert flops.trainable_non_embedding_params == LAYERS * 2 * 8 * D + VOCAB * D  # adapters + lm_head copy
    assert formula - measured == pytest.approx(skipped, rel=1e-12, abs=1e-6)
    assert measured == pytest.approx(formula, rel=0.10)


# ------------------------------------------------------------------------------------------- ZeRO-3
ZERO3_SCRIPT = """
import dataclasses, json, sys
import deepspeed, torch
from pipeline.distributed import init_distributed
from pipeline.throughput import ModelFlops
sys.path.insert(0, "tests")
from test_throughput import llama_config, lora
from transformers import LlamaForCausalLM

init_distributed()
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    model = LlamaForCausalLM(llama_config())
assert all(p.numel() == 0 for p in model.parameters()), "not partitioned"
plain = dataclasses.asdict(ModelFlops.of(model))
peft = dataclasses.asdict(ModelFlops.of(lora(model, ["q_proj", "v_proj"])))
print(json.dumps({"plain": plain, "peft": peft}))
torch.distributed.destroy_process_group()
"""


def test_zero3_partitioned_model_counts_as_the_plain_one():
    """A real ZeRO-3 partition (one gloo rank, in its own process: DeepSpeed's global state stays out of this
    one), where every parameter's numel() is 0 and ds_numel / ds_shape hold the truth."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    child = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["plain"] == dataclasses.asdict(ModelFlops.of(llama()))
    assert result["peft"] == dataclasses.asdict(ModelFlops.of(lora(llama(), ["q_proj", "v_proj"])))


# ---------------------------------------------------------------------------------------------- peaks
@pytest.mark.parametrize(
    "name,dtype,tf32,peak,label",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.5e12, "bf16"),  # SXM
        ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.5e12, "bf16"),
        ("NVIDIA H100 NVL", torch.bfloat16, True, 835.5e12, "bf16"),
        ("NVIDIA H200", torch.float32, True, 494.5e12, "tf32"),
        ("NVIDIA H200", torch.float32, False, 67e12, "fp32"),
        ("NVIDIA H200 NVL", torch.bfloat16, True, 835.5e12, "bf16"),
        ("NVIDIA GH200 480GB", torch.bfloat16, True, 989.5e12, "bf16"),  # not caught by "H200"
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, True, 312e12, "bf16"),  # not caught by "A10"
        ("NVIDIA A100-SXM4-40GB", torch.float32, True, 156e12, "tf32"),
        ("NVIDIA A100 80GB PCIe", torch.bfloat16, True, 312e12, "bf16"),
        ("NVIDIA A10G", torch.bfloat16, True, 70e12, "bf16"),
        ("NVIDIA A10", torch.bfloat16, True, 125e12, "bf16"),
        ("NVIDIA L4", torch.bfloat16, True, 121e12, "bf16"),
        ("NVIDIA L40S", torch.bfloat16, True, 362.05e12, "bf16"),  # not caught by "L40" or "L4"
        ("NVIDIA RTX A6000", torch.bfloat16, True, 154.8e12, "bf16"),
        ("NVIDIA GeForce RTX 4090", torch.float16, True, 165.2e12, "bf16"),
        ("Tesla V100-SXM2-32GB", torch.float32, True, 15.7e12, "fp32"),  # no TF32: the fp32 rate
        ("NVIDIA B200", torch.bfloat16, True, 2250e12, "bf16"),
        ("NVIDIA GB200", torch.bfloat16, True, 2500e12, "bf16"),  # not caught by "B200"
        ("AMD Instinct MI300X", torch.bfloat16, True, 1307.4e12, "bf16"),
        ("AMD Instinct MI300X", torch.float32, True, 163.4e12, "fp32"),
    ],
)
def test_table_resolves_device_names(name, dtype, tf32, peak, label):
    assert table_peak(name, dtype, tf32) == (peak, f"table: {name} {label}")


def test_table_unknowns_and_rows():
    assert table_peak("NVIDIA GeForce GTX 1080", torch.bfloat16) == (None, "unknown device NVIDIA GeForce GTX 1080")
    assert table_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb", torch.bfloat16)[0] is None  # a slice, not the chip
    assert table_peak("Tesla V100-SXM2-16GB", torch.bfloat16)[0] is None  # no bf16 tensor cores
    with pytest.raises(ValueError, match="dtype"):
        table_peak("NVIDIA H100 80GB HBM3", torch.float64)
    for key, bf16, tf32, fp32 in throughput._PEAKS:
        # Each row is reached by its own key (no longer key shadows it), and bf16 >= tf32 >= fp32 (dense rates).
        assert table_peak(key, torch.float32, tf32=False) == (fp32, f"table: {key} fp32")
        rates = [rate for rate in (bf16, tf32, fp32) if rate is not None]
        assert rates == sorted(rates, reverse=True)
    assert peak_flops(torch.device("meta"), torch.float32) == (None, "unknown device meta")


def test_cpu_peak_is_measured_once_and_fast():
    throughput._CPU_PEAKS.clear()
    start = time.perf_counter()
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    first = time.perf_counter() - start
    assert peak is not None and peak > 1e9  # any CPU of this decade does GFLOP/s
    assert source == f"measured: CPU fp32 matmul, {torch.get_num_threads()} threads"
    assert first < 1.0
    start = time.perf_counter()
    assert peak_flops(torch.device("cpu"), torch.float32) == (peak, source)
    assert time.perf_counter() - start < 0.01  # cached: no matmul


# ---------------------------------------------------------------------------------------------- steps
def known_flops(**overrides):
    values = dict(
        total_params=1_100_000_000,
        trainable_params=1_100_000_000,
        non_embedding_params=1_000_000_000,
        trainable_non_embedding_params=1_000_000_000,
        lm_head_params=100_000_000,
        lm_head_trainable=True,
        num_layers=10,
        hidden_size=1000,
        attention_width=1000,
    )
    return ModelFlops(**{**values, **overrides})


def test_step_metrics_arithmetic():
    meter = StepThroughput(known_flops(), peak=1e13, world_size=2)
    record = meter.metrics(tokens=3000, padded_positions=4000, seconds=2.0, seq_len=500)
    per_token = 6e9 + 12 * 10 * 1000 * 500  # 6N + 12 L A s
    assert record == pytest.approx(
        {
            "tokens_per_second": 1500.0,
            "tokens_per_second_per_device": 750.0,
            "padding_fraction": 0.25,
            "tflops_per_device": 3000 * per_token / 2.0 / 2 / 1e12,
            "mfu": 3000 * per_token / 2.0 / 2 / 1e13,
        },
        rel=1e-12,
    )
    # The lm_head on half the tokens only (DPO's completions): its 6 x 1e8 per token counted on 1500 of them.
    half = meter.metrics(tokens=3000, padded_positions=4000, seconds=2.0, seq_len=500, logit_tokens=1500)
    assert half["mfu"] == pytest.approx(3000 * (per_token - 0.5 * 6e8) / 2.0 / 2 / 1e13, rel=1e-12)
    # LoRA-like: a frozen lm_head gets no weight gradient, so skipping it saves 4 x 1e8 per token.
    frozen = known_flops(trainable_non_embedding_params=10_000_000, lm_head_trainable=False)
    assert frozen.train_flops_per_token(500, 0.5) == 4 * (1e9 - 5e7) + 2 * 1e7 + 12 * 10 * 1000 * 500
    # Forward only (the reference pass), and no peak: no mfu.
    reference = StepThroughput(known_flops(), peak=None, world_size=1, forward_only=True)
    record = reference.metrics(tokens=100, padded_positions=100, seconds=1.0, seq_len=10)
    assert "mfu" not in record and record["padding_fraction"] == 0.0
    assert record["tflops_per_device"] == pytest.approx(100 * (2e9 + 4 * 10 * 1000 * 10) / 1e12, rel=1e-12)
    with pytest.raises(ValueError):
        meter.metrics(tokens=10, padded_positions=5, seconds=1.0, seq_len=1)
    with pytest.raises(ValueError):
        meter.metrics(tokens=10, padded_positions=10, seconds=0.0, seq_len=1)


def test_batch_counts_of_a_left_padded_pair_batch():
    # One pair: prompt of 1 token, chosen of 2, rejected of 4: sequences of 3 and 5, left-padded to 5.
    row = dict(example_id=0, prompt_input_ids=[7], chosen_input_ids=[8, 9], rejected_input_ids=[3, 4, 5, 6])
    counts = collate_pairs([row], pad_token_id=0).counts()
    assert counts.dtype == torch.float64
    assert counts.tolist() == [8.0, 10.0, 9.0 + 25.0, 6.0]
    tokens, positions, squares, logits = (counts + counts).tolist()
    assert (tokens, positions, squares / tokens, logits) == (16.0, 20.0, 34.0 / 8.0, 12.0)
    # Packed with a shared prompt: 7 positions, none padding; the prompt's pairs counted once.
    packed = pack_pairs([row], prefix_sharing=True).counts()
    assert packed.tolist() == [7.0, 7.0, 9.0 + 25.0 - 1.0, 6.0]
    assert pack_pairs([row], prefix_sharing=False).counts().tolist() == [8.0, 8.0, 34.0, 6.0]
    # seq_len = sum(l^2) / sum(l) makes tokens x 4LA x seq_len the exact attention FLOPs: 4LA (3^2 + 5^2).
    flops = known_flops()
    attention = flops.forward_flops_per_token(34.0 / 8.0) - flops.forward_flops_per_token(0.0)
    assert 8 * attention == pytest.approx(4 * 10 * 1000 * (9 + 25), rel=1e-12)

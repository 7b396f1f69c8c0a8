"""The shared log-prob function against the obvious computation, its memory-light backward, and the packed
layouts (padding-free, prefix sharing) against the padded one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import logprobs
from pipeline.config import DPOPipelineConfig
from pipeline.layout import BatchLayout
from pipeline.logprobs import collate_pairs, completion_logps, honoured_layout, pack_pairs, token_logprobs


def random_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 500, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [
        dict(example_id=i, prompt_input_ids=[0] + ids(1, 12), chosen_input_ids=ids(1, 9), rejected_input_ids=ids(1, 9))
        for i in range(n)
    ]


def naive_sum(model, prompt, completion):
    """Unpadded, one sequence, full float32 log_softmax: the textbook computation."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[-len(completion) :]


def test_matches_an_unpadded_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = random_rows(6)
    with torch.no_grad():
        out = completion_logps(model, collate_pairs(rows, pad_token_id=2), with_wpo_weights=True)
        naive = [
            naive_sum(model, r["prompt_input_ids"], r[side])
            for side in ("chosen_input_ids", "rejected_input_ids")
            for r in rows
        ]
    torch.testing.assert_close(out.logps, torch.stack([t.sum() for t in naive]), rtol=1e-5, atol=1e-5)
    public = [min(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows] * 2
    torch.testing.assert_close(
        out.public_logps, torch.stack([t[:k].sum() for t, k in zip(naive, public, strict=True)]), rtol=1e-5, atol=1e-5
    )
    assert out.lengths.tolist() == [len(r[s]) for s in ("chosen_input_ids", "rejected_input_ids") for r in rows]
    assert out.wpo_log_weights.shape == (12,) and torch.isfinite(out.wpo_log_weights).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_chunked_backward_matches_log_softmax_autograd(monkeypatch, dtype, tol):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 7 * 3 * 11 * 4)  # 7 positions per chunk: several, one partial
    logits = torch.randn(3, 20, 11).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 20))
    weights = torch.randn(3, 20)
    (token_logprobs(logits, labels) * weights).sum().backward()
    upcast = logits.detach().float().requires_grad_()
    reference = torch.log_softmax(upcast, -1).gather(-1, labels[..., None]).squeeze(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(token_logprobs(logits, labels), reference.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.grad.float(), upcast.grad, rtol=0, atol=tol)
    assert token_logprobs(logits, labels).dtype == torch.float32


def test_padding_does_not_change_a_sequence(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = random_rows(4, seed=1)
    with torch.no_grad():
        together = completion_logps(model, collate_pairs(rows, 2)).logps
        alone = torch.cat([completion_logps(model, collate_pairs([r], 2)).logps for r in rows])
    # Reorder the one-by-one results (chosen, rejected per row) into the batch layout (all chosen, all rejected).
    torch.testing.assert_close(together, torch.cat([alone[0::2], alone[1::2]]), rtol=1e-5, atol=1e-5)


def test_a_chunk_is_sized_in_bytes_whatever_the_vocabulary():
    assert logprobs._chunk(rows=1, vocab=128_256) * 128_256 * 4 <= logprobs.CHUNK_BYTES
    assert logprobs._chunk(rows=8, vocab=32_000) == logprobs.CHUNK_BYTES // (4 * 8 * 32_000)
    assert logprobs._chunk(rows=64, vocab=10**9) == 1  # never zero positions


def weighted_logps_and_grads(model, batch):
    """Per-sequence outputs, and the gradient of a weighting of them that tells chosen from rejected apart."""
    model.zero_grad()
    out = completion_logps(model, batch, with_wpo_weights=True)
    weights = torch.linspace(-1.0, 2.0, out.logps.numel())
    ((out.logps + 0.5 * out.public_logps) * weights).sum().backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared-prompt", "packed"])
@pytest.mark.parametrize("max_tokens", [None, 48], ids=["one-row", "rows-of-48"])
def test_packed_rows_give_the_padded_log_probs_and_gradients(tiny_model_dir, attention, prefix_sharing, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    rows = random_rows(7, seed=3)
    padded, padded_grads = weighted_logps_and_grads(model, collate_pairs(rows, 2))
    packed_batch = pack_pairs(rows, prefix_sharing=prefix_sharing, max_tokens=max_tokens, pad_token_id=2)
    packed, packed_grads = weighted_logps_and_grads(model, packed_batch)
    for name in ("logps", "public_logps", "lengths", "wpo_log_weights"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():  # float rounding, relative to each gradient's own scale
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()))
    # Every pair's tokens once, a shared prompt once; one row without a budget, else rows within it.
    prompts = sum(len(r["prompt_input_ids"]) for r in rows)
    completions = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    tokens = prompts * (1 if prefix_sharing else 2) + completions
    assert packed_batch.counts()[0] == tokens == int((packed_batch.segment_ids >= 0).sum())
    rows_used, width = packed_batch.input_ids.shape
    assert (rows_used, width) == (1, tokens) if max_tokens is None else (rows_used > 1 and width <= max_tokens)


def test_a_shared_prompt_hides_chosen_from_rejected(tiny_model_dir):
    """The block mask is what makes prefix sharing exact: let rejected see chosen and the log-probs move."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = random_rows(4, seed=5)
    batch = pack_pairs(rows, prefix_sharing=True)
    with torch.no_grad():
        padded = completion_logps(model, collate_pairs(rows, 2)).logps
        exact = completion_logps(model, batch).logps
        batch.branch.zero_()  # every token a prompt token: rejected now attends to chosen
        leaked = completion_logps(model, batch).logps
    torch.testing.assert_close(exact, padded, rtol=1e-5, atol=1e-5)
    half = len(rows)
    torch.testing.assert_close(leaked[:half], padded[:half], rtol=1e-5, atol=1e-5)  # chosen never saw rejected
    assert (leaked[half:] - padded[half:]).abs().min() > 1e-3


def test_flash_attention_packs_by_position_ids_without_a_shared_prompt(tiny_model_dir):
    batch = pack_pairs(random_rows(2), prefix_sharing=False)
    assert batch.attention_mask("flash_attention_2", torch.bfloat16) is None  # varlen reads position_ids
    assert (batch.position_ids[0] == 0).sum() == 4  # four segments, each from position 0
    with pytest.raises(ValueError, match="prefix sharing needs sdpa or eager"):
        pack_pairs(random_rows(2), prefix_sharing=True).attention_mask("flash_attention_2", torch.bfloat16)
    auto = DPOPipelineConfig(attn_implementation="flash_attention_2", max_length=256)
    assert BatchLayout.of(auto) == BatchLayout(padding_free=True, prefix_sharing=False, max_packed_tokens=512)
    assert BatchLayout.of(DPOPipelineConfig(max_length=None)) == BatchLayout(True, True, max_packed_tokens=None)


def test_a_model_that_ignores_the_packed_mask_is_scored_padded(tiny_model_dir, monkeypatch, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    model.model.layers[0].eval()  # a module left in eval on purpose stays so; the others stay in train
    config = DPOPipelineConfig(max_packed_tokens=64)
    assert honoured_layout(model, config, pad_token_id=2) == BatchLayout(True, True, max_packed_tokens=64)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    # A model whose attention drops custom masks (as remote code without the 4D-mask path does): plain causal.
    monkeypatch.setattr(logprobs.PackedPairBatch, "attention_mask", lambda self, *args: None)
    with caplog.at_level("WARNING"):
        layout = honoured_layout(model, config, pad_token_id=2)
    assert layout == BatchLayout(padding_free=False, prefix_sharing=False, max_packed_tokens=64)
    assert "does not honour packed rows" in caplog.text and "scoring padded rows instead" in caplog.text


def small_model(architecture: str, attention: str):
    """A randomly initialised model of ``architecture`` with a sliding window of 5 tokens, shorter than the test
    sequences: every layer (Mistral), alternating with full layers (Gemma 2), some layers (Qwen2)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=5, attn_implementation=attention,
    )  # fmt: skip
    extra = {
        "mistral": {},
        "gemma2": {"query_pre_attn_scalar": 8, "final_logit_softcapping": None, "attn_logit_softcapping": None},
        "qwen2": {"use_sliding_window": True, "max_window_layers": 1},
    }[architecture]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(architecture, **common, **extra)).eval()


@pytest.mark.parametrize(
    "architecture, attention",
    [("mistral", "sdpa"), ("mistral", "eager"), ("gemma2", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager")],
)  # transformers has no SDPA for Gemma 2
def test_sliding_window_layers_keep_their_window_in_packed_rows(architecture, attention):
    model = small_model(architecture, attention)
    layer_types = getattr(model.config, "layer_types", None)
    assert architecture == "mistral" or {"full_attention", "sliding_attention"} <= set(layer_types)
    rows = random_rows(5, seed=7)  # prompts up to 12 tokens and completions up to 8: longer than the window
    with torch.no_grad():
        padded = completion_logps(model, collate_pairs(rows, 2)).logps
        for sharing in (True, False):
            packed = completion_logps(model, pack_pairs(rows, prefix_sharing=sharing, max_tokens=40)).logps
            torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        # Without the window the packed rows would see more context than the padded ones: a real difference.
        model.config.sliding_window = None
        unwindowed = completion_logps(model, pack_pairs(rows, prefix_sharing=True)).logps
    assert (unwindowed - padded).abs().max() > 1e-3

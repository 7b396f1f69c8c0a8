"""The shared log-prob function against the obvious computation, and its memory-light backward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import logprobs
from pipeline.logprobs import collate_pairs, completion_logps, token_logprobs


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
    monkeypatch.setattr(logprobs, "CHUNK_POSITIONS", 7)  # several chunks, one partial
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

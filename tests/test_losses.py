"""Tests for pipeline.losses: every variant against an independently written expression (float64)."""

import contextlib
import copy
import json
import math
import threading

import pytest
import torch

from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.loss_spec import LOSS_TYPES, LossSpec
from pipeline.losses import (
    LossState,
    PairLogps,
    compute_loss,
    dpo_loss,
    preference_loss,
)

B = 8
BETA = 0.3
EPS = 0.15
TAU = 0.05
F64 = torch.float64

# The expected values below use these rather than torch.nn.functional, so they do not share code with the module.


def logsig(z):
    return -torch.log1p(torch.exp(-z))


def sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def sorted_tensor(t):
    return torch.tensor(sorted(t.tolist()), dtype=F64)


def draw(seed, spread=4.0):
    """Summed log-probs around −30; the policy sits `spread` nats (std) away from the reference."""
    g = torch.Generator().manual_seed(seed)
    rc = torch.randn(B, dtype=F64, generator=g) * 4 - 30
    rr = torch.randn(B, dtype=F64, generator=g) * 4 - 30
    pc = rc + torch.randn(B, dtype=F64, generator=g) * spread
    pr = rr + torch.randn(B, dtype=F64, generator=g) * spread
    lw = torch.randint(1, 40, (B,), generator=g)
    ll = torch.randint(1, 40, (B,), generator=g)
    return pc, pr, rc, rr, lw, ll


def expected_losses(name, pc, pr, rc, rr, lw, ll, delta=0.0):
    """Per-example losses written from the papers, for reverse KL."""
    a, b = pc - rc, pr - rr  # per-side log-ratios
    h = a - b
    z = BETA * h
    return {
        "sigmoid": lambda: -(1 - EPS) * logsig(z) - EPS * logsig(-z),
        "hinge": lambda: torch.clamp(1 - z, min=0),
        "ipo": lambda: (h - 1 / (2 * BETA)) ** 2,
        "exo_pair": lambda: sig(z) * torch.log(sig(z) / (1 - EPS)) + sig(-z) * torch.log(sig(-z) / EPS),
        "nca_pair": lambda: -logsig(BETA * a) - 0.5 * logsig(-BETA * a) - 0.5 * logsig(-BETA * b),
        "robust": lambda: ((1 - EPS) * -logsig(z) + EPS * logsig(-z)) / (1 - 2 * EPS),
        "bco_pair": lambda: -logsig(BETA * a - delta) - logsig(delta - BETA * b),
        "sppo_hard": lambda: (a - 1 / (2 * BETA)) ** 2 + (b + 1 / (2 * BETA)) ** 2,
        "aot": lambda: (
            -(1 - EPS) * logsig(BETA * (sorted_tensor(pc - pr) - sorted_tensor(rc - rr)))
            - EPS * logsig(-BETA * (sorted_tensor(pc - pr) - sorted_tensor(rc - rr)))
        ),
        "aot_pair": lambda: (
            -(1 - EPS) * logsig(BETA * (sorted_tensor(a) - sorted_tensor(b)))
            - EPS * logsig(-BETA * (sorted_tensor(a) - sorted_tensor(b)))
        ),
        "apo_zero": lambda: (1 - sig(BETA * a)) + sig(BETA * b),
        "apo_down": lambda: sig(BETA * a) + (1 - sig(z)),
        "discopop": lambda: (1 - sig(z / TAU)) * -logsig(z) + sig(z / TAU) * torch.exp(-z),
        "sft": lambda: -pc * len(lw) / lw.sum(),
        "sigmoid_norm": lambda: -logsig(BETA * (a / lw - b / ll)),
    }[name]()


def call(name, pc, pr, rc, rr, lw, ll, **kw):
    return dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=name,
        beta=BETA,
        label_smoothing=EPS,
        discopop_tau=TAU,
        chosen_lengths=lw,
        rejected_lengths=ll,
        **kw,
    )


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", [n for n in LOSS_TYPES if n != "aot_unpaired"])
def test_every_variant_matches_independent_expression(name):
    pc, pr, rc, rr, lw, ll = draw(1)
    losses, chosen_rewards, rejected_rewards = call(name, pc, pr, rc, rr, lw, ll, bco_delta=0.37)
    close(losses, expected_losses(name, pc, pr, rc, rr, lw, ll, delta=0.37))
    close(chosen_rewards, BETA * (pc - rc))
    close(rejected_rewards, BETA * (pr - rr))
    assert losses.shape == (B,)


def test_aot_unpaired_is_aot_pair():
    pc, pr, rc, rr, lw, ll = draw(2)
    close(call("aot_unpaired", pc, pr, rc, rr, lw, ll)[0], expected_losses("aot_pair", pc, pr, rc, rr, lw, ll))
    assert LossSpec(loss_type=["aot_unpaired"], label_smoothing=0.1).loss_type == ("aot_pair",)


def test_ipo_length_normalized_is_per_token():
    pc, pr, rc, rr, lw, ll = draw(3)
    losses = call("ipo", pc, pr, rc, rr, lw, ll, ipo_length_normalized=True)[0]
    close(losses, ((pc - rc) / lw - (pr - rr) / ll - 1 / (2 * BETA)) ** 2)


def test_sft_batch_mean_is_token_mean_nll():
    pc, pr, rc, rr, lw, ll = draw(4)
    losses = call("sft", pc, pr, rc, rr, lw, None)[0]
    close(losses.mean(), -pc.sum() / lw.sum())


def test_reference_free_drops_reference_from_loss_only():
    pc, pr, rc, rr, lw, ll = draw(5)
    losses, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, reference_free=True)
    close(losses, -logsig(BETA * (pc - pr)))
    close(chosen_rewards, BETA * (pc - rc))


# ---------------------------------------------------------------------------------------------------- f-divergences


def f_prime(kind, u, alpha=None):
    """f'(u) of each f-divergence, u = π/π_ref (Wang et al. 2023, table 1)."""
    if kind == "reverse_kl":
        return torch.log(u)
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return torch.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


@pytest.mark.parametrize(
    "kind, alpha",
    [
        ("reverse_kl", 1.0),
        ("forward_kl", 1.0),
        ("js_divergence", 1.0),
        ("alpha_divergence", 0.0),
        ("alpha_divergence", 0.4),
        ("alpha_divergence", 0.9),
    ],
)
def test_f_divergence_margin(kind, alpha):
    pc, pr, rc, rr, lw, ll = draw(6, spread=1.0)
    uw, ul = torch.exp(pc - rc), torch.exp(pr - rr)
    kw = dict(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    h = f_prime(kind, uw, alpha) - f_prime(kind, ul, alpha)
    close(dpo_loss(pc, pr, rc, rr, **kw)[0], -logsig(BETA * h))
    # A per-side variant sees the scores themselves, ψ(r) = f'(e^r) with ψ(0) = 0.
    sw, sl = f_prime(kind, uw, alpha), f_prime(kind, ul, alpha)
    close(
        dpo_loss(pc, pr, rc, rr, loss_type="sppo_hard", **kw)[0],
        (sw - 1 / (2 * BETA)) ** 2 + (sl + 1 / (2 * BETA)) ** 2,
    )


def test_alpha_divergence_endpoints_and_trl0_convention():
    pc, pr, rc, rr, _, _ = draw(7, spread=1.0)

    def loss(kind, alpha=1.0):
        return dpo_loss(pc, pr, rc, rr, beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=alpha)[0]

    close(loss("alpha_divergence", 1.0), loss("reverse_kl"))
    close(loss("alpha_divergence", 0.0), loss("forward_kl"))
    close(loss("alpha_divergence", 1 - 1e-9), loss("reverse_kl"))  # continuous at α → 1
    # TRL 0.x: h = (u_l^(−c) − u_w^(−c)) / c; its coefficient c is our 1 − c.
    for c in (0.25, 0.5, 1.0):
        uw, ul = torch.exp(pc - rc), torch.exp(pr - rr)
        close(loss("alpha_divergence", 1 - c), -logsig(BETA * (ul**-c - uw**-c) / c))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_sigmoid_is_ln2_at_policy_equals_reference(kind):
    pc, pr, _, _, _, _ = draw(8)
    kw = dict(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=0.5)
    close(dpo_loss(pc, pr, pc.clone(), pr.clone(), **kw)[0], torch.full((B,), math.log(2), dtype=F64))
    close(preference_loss(pc, pr, pc.clone(), pr.clone(), beta=BETA)[0], torch.full((B,), math.log(2), dtype=F64))
    loss, _ = compute_loss(PairLogps(pc, pr), PairLogps(pc.clone(), pr.clone()), LossSpec(**kw))
    close(loss, torch.tensor(math.log(2), dtype=F64))


# -------------------------------------------------------------------------------------------------- preference_loss


@pytest.mark.parametrize(
    "label_smoothing, ipo, reference_free",
    [(0.0, False, False), (0.2, False, False), (0.0, True, False), (0.1, False, True)],
)
def test_preference_loss_matches_original_repository(label_smoothing, ipo, reference_free):
    pc, pr, rc, rr, _, _ = draw(9)
    h = (pc - pr) - (0 if reference_free else rc - rr)
    if ipo:
        expected = (h - 1 / (2 * BETA)) ** 2
    else:
        expected = -logsig(BETA * h) * (1 - label_smoothing) - logsig(-BETA * h) * label_smoothing
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, BETA, label_smoothing, ipo, reference_free
    )
    close(losses, expected)
    close(chosen_rewards, BETA * (pc - rc))
    close(rejected_rewards, BETA * (pr - rr))


# -------------------------------------------------------------------------------------------------------- gradients


def full_pairs(seed, requires_grad):
    pc, pr, rc, rr, lw, ll = draw(seed)

    def leaf(t):
        return t.clone().requires_grad_(requires_grad)

    g = torch.Generator().manual_seed(seed + 100)
    policy = PairLogps(
        leaf(pc),
        leaf(pr),
        lw,
        ll,
        leaf(pc * 0.6),
        leaf(pr * 0.6),
        leaf(-torch.rand(B, dtype=F64, generator=g)),
        leaf(-torch.rand(B, dtype=F64, generator=g)),
    )
    reference = PairLogps(leaf(rc), leaf(rr), lw, ll, leaf(rc * 0.6), leaf(rr * 0.6))
    return policy, reference


@pytest.mark.parametrize("name", LOSS_TYPES)
@pytest.mark.parametrize("extras", [{}, {"ld_alpha": 0.5, "use_weighting": True}])
def test_gradients_reach_policy_only(name, extras):
    policy, reference = full_pairs(10, requires_grad=True)
    spec = LossSpec(loss_type=name, beta=BETA, label_smoothing=EPS, **extras)
    loss, metrics = compute_loss(policy, reference, spec, LossState())
    loss.backward()
    assert all(
        getattr(reference, f) is None or getattr(reference, f).grad is None
        for f in ("chosen", "rejected", "chosen_public", "rejected_public")
    )
    # WPO weights are constants of the step, like TRL's (computed under no_grad).
    assert policy.chosen_wpo_log_weights.grad is None and policy.rejected_wpo_log_weights.grad is None
    policy_grads = [
        t.grad
        for t in (policy.chosen, policy.rejected, policy.chosen_public, policy.rejected_public)
        if t.grad is not None
    ]
    assert policy_grads and any(g.abs().sum() > 0 for g in policy_grads)
    assert all(not v.requires_grad for v in metrics.values())


# ----------------------------------------------------------------------------------------------------- compute_loss


def test_mpo_is_weighted_sum_of_term_means():
    pc, pr, rc, rr, lw, ll = draw(11)
    spec = LossSpec(loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.8, 0.05, 1.0], beta=BETA, label_smoothing=EPS)
    loss, metrics = compute_loss(PairLogps(pc, pr, lw, ll), PairLogps(rc, rr), spec)
    terms = {n: expected_losses(n, pc, pr, rc, rr, lw, ll).mean() for n in ("sigmoid", "ipo", "sft")}
    close(loss, 0.8 * terms["sigmoid"] + 0.05 * terms["ipo"] + 1.0 * terms["sft"])
    for n, value in terms.items():
        close(metrics[f"loss/{n}"], value)
    close(metrics["loss"], loss.detach())


def test_metrics():
    pc, pr, rc, rr, _, _ = draw(12)
    _, metrics = compute_loss(PairLogps(pc, pr), PairLogps(rc, rr), LossSpec(beta=BETA))
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss",
        "loss/sigmoid",
    }
    close(metrics["rewards/chosen"], (BETA * (pc - rc)).mean())
    close(metrics["rewards/rejected"], (BETA * (pr - rr)).mean())
    close(metrics["rewards/margins"], (BETA * ((pc - rc) - (pr - rr))).mean())
    close(
        metrics["rewards/accuracies"],
        torch.tensor(
            sum(float(w > lose) for w, lose in zip((pc - rc).tolist(), (pr - rr).tolist(), strict=True)) / B, dtype=F64
        ),
    )
    close(metrics["logps/chosen"], pc.mean())
    close(metrics["logps/rejected"], pr.mean())


def test_reference_none_when_reference_free():
    pc, pr, *_ = draw(13)
    loss, metrics = compute_loss(PairLogps(pc, pr), None, LossSpec(beta=BETA, reference_free=True))
    close(loss, (-logsig(BETA * (pc - pr))).mean())
    close(metrics["rewards/chosen"], (BETA * pc).mean())


def test_ld_dpo_hand_computed():
    # Policy: chosen −10 (first min-length tokens −4), rejected −12 (−4); reference: −11 (−5), −10 (−3).
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    policy = PairLogps(t(-10.0), t(-12.0), chosen_public=t(-4.0), rejected_public=t(-4.0))
    reference = PairLogps(t(-11.0), t(-10.0), chosen_public=t(-5.0), rejected_public=t(-3.0))
    loss, metrics = compute_loss(policy, reference, LossSpec(beta=0.1, ld_alpha=0.5))
    # public + α·tail: policy −7, −8; reference −8, −6.5; h = (−7 + 8) − (−8 + 6.5) = 2.5.
    close(loss, torch.tensor(math.log1p(math.exp(-0.25)), dtype=F64))
    close(metrics["logps/chosen"], t(-7.0)[0])
    close(metrics["rewards/chosen"], t(0.1)[0])
    close(metrics["rewards/rejected"], t(-0.15)[0])
    # α = 1 is plain DPO: h = (−10 + 11) − (−12 + 10) = 3.
    loss, _ = compute_loss(policy, reference, LossSpec(beta=0.1, ld_alpha=1.0))
    close(loss, torch.tensor(math.log1p(math.exp(-0.3)), dtype=F64))


def test_wpo_hand_computed():
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    # Margins h = 2 and −1; pair log-weights −0.2 − 0.1 = −0.3 and 0.3 + 0.4 > 0 (clamped to weight 1).
    policy = PairLogps(
        t(-5.0, -6.0), t(-7.0, -5.0), chosen_wpo_log_weights=t(-0.2, 0.3), rejected_wpo_log_weights=t(-0.1, 0.4)
    )
    reference = PairLogps(t(-5.0, -6.0), t(-5.0, -6.0))
    loss, metrics = compute_loss(policy, reference, LossSpec(beta=1.0, use_weighting=True))
    expected = (math.exp(-0.3) * math.log1p(math.exp(-2.0)) + 1.0 * math.log1p(math.exp(1.0))) / 2
    close(loss, torch.tensor(expected, dtype=F64))
    close(metrics["loss/sigmoid"], torch.tensor(expected, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------- BCO


def bco_batches(steps, seed=14):
    return [draw(seed + i)[:4] for i in range(steps)]


def run_bco(state, batches, spec):
    return [compute_loss(PairLogps(pc, pr), PairLogps(rc, rr), spec, state)[0] for pc, pr, rc, rr in batches]


def test_bco_running_mean_hand_computed():
    spec = LossSpec(loss_type="bco_pair", beta=BETA)
    batches = bco_batches(3)
    state = LossState()
    losses = run_bco(state, batches, spec)
    means = [torch.cat([BETA * (pc - rc), BETA * (pr - rr)]).mean() for pc, pr, rc, rr in batches]
    for step, (pc, pr, rc, rr) in enumerate(batches):
        delta = sum(means[: step + 1]) / (step + 1)
        close(losses[step], expected_losses("bco_pair", pc, pr, rc, rr, None, None, delta=delta).mean())
    close(state.bco_delta, sum(means) / 3)


def test_bco_state_round_trip():
    spec = LossSpec(loss_type=["sigmoid", "bco_pair"], beta=BETA)
    batches = bco_batches(4)
    uninterrupted = run_bco(LossState(), batches, spec)
    first = LossState()
    run_bco(first, batches[:2], spec)
    saved = json.loads(json.dumps(first.state_dict()))  # checkpoints may store it as JSON
    resumed = LossState()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    for a, b in zip(run_bco(resumed, batches[2:], spec), uninterrupted[2:], strict=True):
        close(a, b)


def test_bco_delta_same_with_two_ranks_as_one_process():
    """Two ranks with half the batch each, joined by a sum all-reduce, keep the one-process δ."""
    spec = LossSpec(loss_type="bco_pair", beta=BETA)
    batches = bco_batches(3)
    single = LossState()
    run_bco(single, batches, spec)

    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_sum(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total

        return reduce

    states = [LossState(all_reduce_sum(0)), LossState(all_reduce_sum(1))]
    halves = [[tuple(t[:3] for t in b) for b in batches], [tuple(t[3:] for t in b) for b in batches]]
    threads = [threading.Thread(target=run_bco, args=(states[r], halves[r], spec)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for state in states:
        close(state.bco_delta, single.bco_delta)


# ------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="sigmod"), r"loss_type: unknown 'sigmod'; valid: sigmoid, hinge, ipo"),
        (dict(loss_type=[]), "loss_type: empty"),
        (dict(loss_type=3), "loss_type: expected one value or a list"),
        (dict(loss_type=["aot_pair", "aot_unpaired"]), "loss_type: .* twice"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights: 1 weights for 2 loss types"),
        (dict(loss_weights=[-1.0]), "loss_weights: must be >= 0"),
        (dict(beta=0.0), "beta: must be > 0"),
        (dict(beta=-0.1), "beta: must be > 0"),
        (dict(beta=float("nan")), "beta: expected a finite number"),
        (dict(label_smoothing=-0.01), r"label_smoothing: must be in \[0, 0.5\)"),
        (dict(label_smoothing=0.5), r"label_smoothing: must be in \[0, 0.5\)"),
        (dict(loss_type="exo_pair"), "label_smoothing: exo_pair needs label_smoothing > 0"),
        (dict(f_divergence_type="kl"), "f_divergence_type: unknown 'kl'"),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5), "f_alpha_divergence_coef: must be"),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=-0.1), "f_alpha_divergence_coef: must be"),
        (dict(loss_type="aot", f_divergence_type="js_divergence"), "f_divergence_type: aot"),
        (dict(discopop_tau=0.0), "discopop_tau: must be > 0"),
        (dict(ld_alpha=1.2), "ld_alpha: must be in"),
        (dict(reference_free="yes"), "reference_free: expected true or false"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossSpec(**kwargs)


def test_bad_spec_through_dpo_loss():
    pc, pr, rc, rr, _, _ = draw(15)
    with pytest.raises(ConfigError, match="loss_type: unknown 'dpo'"):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ConfigError, match="beta: must be > 0"):
        preference_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(TypeError, match="loss_type: dpo_loss takes one variant name"):
        dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"])


@contextlib.contextmanager
def raises_bug(match: str):
    """A caller's bug (a shape mismatch, a missing field): a ValueError that is not a PipelineError, so the CLI
    keeps its traceback instead of printing it as a user's one-line error."""
    with pytest.raises(ValueError, match=match) as caught:
        yield
    assert not isinstance(caught.value, PipelineError), caught.value


def test_mismatched_shapes():
    pc, pr, rc, rr, lw, _ = draw(16)
    with raises_bug(r"ref_rejected_logps: shape \(7,\) does not match"):
        dpo_loss(pc, pr, rc, rr[:7])
    with raises_bug(r"chosen_lengths: shape \(7,\)"):
        dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=lw[:7])
    with raises_bug(r"policy_chosen_logps: expected shape \(batch,\)"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with raises_bug("rejected: shape"):
        PairLogps(pc, pr[:4])
    with raises_bug("reference: shape"):
        compute_loss(PairLogps(pc, pr), PairLogps(rc[:4], rr[:4]), LossSpec())


@pytest.mark.parametrize(
    "spec, match",
    [
        (LossSpec(ld_alpha=0.5), r"ld_alpha \(LD-DPO\): the policy PairLogps lacks chosen_public, rejected_public"),
        (LossSpec(use_weighting=True), r"use_weighting \(WPO\): the policy PairLogps lacks chosen_wpo_log_weights"),
        (LossSpec(loss_type="sft"), "loss_type: 'sft' needs chosen_lengths"),
        (LossSpec(loss_type="sigmoid_norm"), "loss_type: 'sigmoid_norm' needs chosen_lengths and rejected_lengths"),
        (
            LossSpec(loss_type="ipo", ipo_length_normalized=True),
            "loss_type: 'ipo with ipo_length_normalized' needs chosen_lengths",
        ),
        (LossSpec(loss_type="bco_pair"), "bco_pair keeps a running reward mean; pass a LossState"),
    ],
)
def test_missing_fields(spec, match):
    pc, pr, rc, rr, _, _ = draw(17)
    with raises_bug(match):
        compute_loss(PairLogps(pc, pr), PairLogps(rc, rr), spec)


def test_missing_reference_fields_and_reference():
    pc, pr, rc, rr, _, _ = draw(18)
    policy = PairLogps(pc, pr, chosen_public=pc, rejected_public=pr)
    with raises_bug("the reference PairLogps lacks chosen_public"):
        compute_loss(policy, PairLogps(rc, rr), LossSpec(ld_alpha=0.5))
    with raises_bug("reference_free: a reference is required"):
        compute_loss(policy, None, LossSpec())


def test_bad_state_dict():
    state = LossState()
    with pytest.raises(ArtifactError, match="LossState: expected keys"):
        state.load_state_dict({"bco_mean": 0.0})
    with pytest.raises(ArtifactError, match="bco_count must be a count"):
        state.load_state_dict({"bco_mean": 0.0, "bco_count": -1})
    assert copy.deepcopy(state).state_dict() == {"bco_mean": 0.0, "bco_count": 0}

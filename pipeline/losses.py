"""The DPO loss family, working from per-sequence log-probabilities alone.

Layers, from the inside out:

* one small pure function per variant (``_sigmoid``, ``_hinge``, ...) on :class:`VariantInputs`, registered in
  :data:`LOSS_REGISTRY`; adding a variant is one function (formula and paper in its docstring) and one entry;
* :func:`dpo_loss`: every variant through one call, per-example losses of shape (B,) (TRL's ``dpo_loss``);
* :func:`preference_loss`: the original DPO repository's function (DPO, conservative DPO, IPO, reference-free);
* :func:`compute_loss`: what the training loop calls; applies LD-DPO and WPO from :class:`PairLogps`, keeps BCO's
  running reward mean in :class:`LossState`, sums the MPO terms and returns the metrics.

Notation (all tensors shape (B,), one entry per preference pair, chosen ``w`` and rejected ``l``)::

    r_w = log π(y_w|x) − log π_ref(y_w|x)        per-side log-ratio (π_ref ≡ 1 when reference_free)
    s_w = ψ(r_w)                                  f-divergence score; ψ(r) = r for reverse KL (standard DPO)
    h   = s_w − s_l                               the DPO margin; (π_w − ref_w) − (π_l − ref_l) for reverse KL

Where TRL versions disagree, and what this module does (see also docs/losses.md):

* alpha divergence: TRL 0.x scored ``−u^(−α)/α`` (so α = 1 was forward KL), TRL 1.x scores ``u^(α−1)/(α−1)``
  (α → 1 is reverse KL, α = 0 forward KL). We follow TRL 1.x's parameterisation; a TRL 0.x coefficient c is our
  1 − c.
* f-divergence scores are ψ(r) = f'(e^r) − f'(1), so ψ(0) = 0 for every divergence (the implicit reward is 0
  at policy == reference, as in DPO); TRL drops other constants. Losses of h are identical to TRL; the per-side
  losses (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down) differ from TRL 1.x by that constant when the
  divergence is not reverse KL.
* IPO: on summed log-probs as in the original repository and the IPO paper; ``ipo_length_normalized`` gives
  TRL 1.x's per-token form.
* LD-DPO applies to both the policy and the reference log-probs (paper, TRL 1.x); TRL 0.x applied it to the
  policy only.
* WPO weights are clamped at 1 (TRL 0.x; TRL 1.x dropped the clamp).
* bco_pair keeps the BCO paper's running reward mean δ (TRL 0.x); TRL 1.x dropped δ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import ArtifactError
from pipeline.loss_spec import F_DIVERGENCE_TYPES, VARIANTS, LossSpec

__all__ = [
    "LOSS_REGISTRY",
    "LossState",
    "PairLogps",
    "VariantInputs",
    "compute_loss",
    "dpo_loss",
    "f_divergence_scores",
    "ld_dpo_logps",
    "preference_loss",
    "wpo_weights",
]


# ---------------------------------------------------------------------------------------------------------------
# f-divergences (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240): the DPO reward β·log u, u = π/π_ref,
# generalises to β·f'(u) for an f-divergence D_f(π || π_ref). Each function maps r = log u to
# ψ(r) = f'(e^r) − f'(1): the constant cancels in h, and ψ(0) = 0 keeps per-side rewards 0 at policy == reference.
# ---------------------------------------------------------------------------------------------------------------


def _reverse_kl(r: Tensor, alpha: float) -> Tensor:
    """KL(π || π_ref), standard DPO: f(u) = u·log u, f'(u) = log u + 1, ψ(r) = r."""
    return r


def _forward_kl(r: Tensor, alpha: float) -> Tensor:
    """KL(π_ref || π): f(u) = −log u, f'(u) = 1 − 1/u, ψ(r) = 1 − e^(−r)."""
    return -torch.expm1(-r)


def _js_divergence(r: Tensor, alpha: float) -> Tensor:
    """Jensen-Shannon: f'(u) = log(2u / (1 + u)), ψ(r) = log 2 + logσ(r)."""
    return F.logsigmoid(r) + math.log(2.0)


def _alpha_divergence(r: Tensor, alpha: float) -> Tensor:
    """Amari alpha divergence, TRL 1.x parameterisation: f'(u) − f'(1) = (u^(α−1) − 1)/(α − 1), α in [0, 1].

    α = 0 is forward KL, α → 1 is reverse KL (taken exactly at α = 1, where the formula is 0/0).
    """
    if alpha == 1.0:
        return r
    # expm1 keeps the "− 1" exact, so scores stay continuous as α → 1 instead of growing like 1/(α − 1).
    return torch.expm1((alpha - 1.0) * r) / (alpha - 1.0)


_F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}
assert tuple(_F_DIVERGENCES) == F_DIVERGENCE_TYPES, "pipeline.loss_spec names the divergences this module has"


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 1.0
) -> Tensor:
    """ψ(r) for per-side log-ratios r = log π − log π_ref of any shape; ψ(0) = 0 for every divergence."""
    return _f_divergence(f_divergence_type)(logratios, f_alpha_divergence_coef)


def _f_divergence(name: str) -> Callable[[Tensor, float], Tensor]:
    if name not in _F_DIVERGENCES:
        raise ValueError(f"f_divergence_type: unknown {name!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}")
    return _F_DIVERGENCES[name]


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantInputs:
    """What a variant sees; every tensor has shape (B,), and only the policy side carries gradients.

    chosen, rejected: f-divergence scores s_w = ψ(r_w), s_l = ψ(r_l) of the per-side log-ratios.
    policy_margin, reference_margin: π_w − π_l and ref_w − ref_l (AOT sorts these; reference is 0 when
    reference_free). policy_chosen: log π(y_w|x) summed over completion tokens (SFT). chosen_lengths,
    rejected_lengths: completion token counts, or None when the caller has none. bco_delta: BCO's running mean δ.
    """

    chosen: Tensor
    rejected: Tensor
    policy_margin: Tensor
    reference_margin: Tensor
    policy_chosen: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    bco_delta: Tensor | float

    @property
    def margin(self) -> Tensor:
        """h = s_w − s_l."""
        return self.chosen - self.rejected

    def lengths(self, variant: str) -> tuple[Tensor, Tensor]:
        """(len_w, len_l) as floats clamped to >= 1 (an empty completion must not divide by zero)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(f"loss_type: {variant!r} needs chosen_lengths and rejected_lengths")
        return (
            self.chosen_lengths.to(self.chosen.dtype).clamp(min=1.0),
            self.rejected_lengths.to(self.chosen.dtype).clamp(min=1.0),
        )

    def normalized_margin(self, variant: str) -> Tensor:
        """Per-token margin s_w/|y_w| − s_l/|y_l|, TRL 1.x's length normalisation."""
        len_w, len_l = self.lengths(variant)
        return self.chosen / len_w - self.rejected / len_l


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): the logistic loss against labels flipped with probability ε."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(x: VariantInputs, spec: LossSpec) -> Tensor:
    """DPO, ℓ = −logσ(β·h) (Rafailov et al. 2023, arXiv:2305.18290, eq. 7).

    With ε = label_smoothing > 0 it is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences",
    eq. 3): ℓ = −(1−ε)·logσ(β·h) − ε·logσ(−β·h).
    """
    return _smoothed_logistic(spec.beta * x.margin, spec.label_smoothing)


def _hinge(x: VariantInputs, spec: LossSpec) -> Tensor:
    """SLiC hinge loss, ℓ = relu(1 − β·h) (Zhao et al. 2023, arXiv:2305.10425; RSO, arXiv:2309.06657)."""
    return torch.relu(1.0 - spec.beta * x.margin)


def _ipo(x: VariantInputs, spec: LossSpec) -> Tensor:
    """IPO, ℓ = (h − 1/(2β))² (Azar et al. 2023, arXiv:2310.12036, eq. 17; β is the paper's τ).

    On summed log-probs as in the paper and the original DPO repository; with ipo_length_normalized, h is the
    per-token margin s_w/|y_w| − s_l/|y_l| as in TRL 1.x (the squared loss otherwise grows with length).
    """
    margin = x.normalized_margin("ipo with ipo_length_normalized") if spec.ipo_length_normalized else x.margin
    return (margin - 1.0 / (2.0 * spec.beta)) ** 2


def _exo_pair(x: VariantInputs, spec: LossSpec) -> Tensor:
    """EXO, reverse KL between the model's and the labels' pair distributions (Ji et al. 2024, arXiv:2402.00856,
    eq. 16): ℓ = σ(βh)·(logσ(βh) − log(1−ε)) + σ(−βh)·(logσ(−βh) − log ε), ε = label_smoothing > 0."""
    z = spec.beta * x.margin
    eps = spec.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(x: VariantInputs, spec: LossSpec) -> Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv:2402.05369), on absolute rewards βs:
    ℓ = −logσ(β·s_w) − ½·logσ(−β·s_w) − ½·logσ(−β·s_l)."""
    chosen, rejected = spec.beta * x.chosen, spec.beta * x.rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(x: VariantInputs, spec: LossSpec) -> Tensor:
    """Robust DPO, unbiased under label noise ε (Chowdhury et al. 2024, arXiv:2403.00409):
    ℓ = (−(1−ε)·logσ(β·h) + ε·logσ(−β·h)) / (1 − 2ε)."""
    z = spec.beta * x.margin
    eps = spec.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(x: VariantInputs, spec: LossSpec) -> Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", arXiv:2404.04656):
    ℓ = −logσ(β·s_w − δ) − logσ(−(β·s_l − δ)), δ = running mean of the rewards β·s (see :class:`LossState`)."""
    return -F.logsigmoid(spec.beta * x.chosen - x.bco_delta) - F.logsigmoid(-(spec.beta * x.rejected - x.bco_delta))


def _sppo_hard(x: VariantInputs, spec: LossSpec) -> Tensor:
    """SPPO with hard win probabilities P(y_w ≻ y_l) = 1 (Wu et al. 2024, arXiv:2405.00675, eq. 4.7):
    ℓ = (s_w − 1/(2β))² + (s_l + 1/(2β))²."""
    target = 0.5 / spec.beta
    return (x.chosen - target) ** 2 + (x.rejected + target) ** 2


def _aot(x: VariantInputs, spec: LossSpec) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    arXiv:2406.05882): Δ = sort_B(π_w − π_l) − sort_B(ref_w − ref_l), ℓ = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ).

    Sorting couples the batch: entry i is the i-th quantile, not pair i, and the batch is the local one.
    """
    delta = torch.sort(x.policy_margin).values - torch.sort(x.reference_margin).values
    return _smoothed_logistic(spec.beta * delta, spec.label_smoothing)


def _aot_pair(x: VariantInputs, spec: LossSpec) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882; TRL 1.x calls it aot_unpaired):
    Δ = sort_B(s_w) − sort_B(s_l), ℓ = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ). Entries are quantiles, as in aot."""
    delta = torch.sort(x.chosen).values - torch.sort(x.rejected).values
    return _smoothed_logistic(spec.beta * delta, spec.label_smoothing)


def _apo_zero(x: VariantInputs, spec: LossSpec) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, eq. 7), for
    chosen outputs better than the model's: ℓ = (1 − σ(β·s_w)) + σ(β·s_l)."""
    return 1.0 - torch.sigmoid(spec.beta * x.chosen) + torch.sigmoid(spec.beta * x.rejected)


def _apo_down(x: VariantInputs, spec: LossSpec) -> Tensor:
    """APO-down (arXiv:2408.06266, eq. 8), for chosen outputs worse than the model's:
    ℓ = σ(β·s_w) + (1 − σ(β·h))."""
    return torch.sigmoid(spec.beta * x.chosen) + 1.0 - torch.sigmoid(spec.beta * x.margin)


def _discopop(x: VariantInputs, spec: LossSpec) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, eq. 5), with z = β·h,
    m = σ(z/τ), τ = discopop_tau: ℓ = (1 − m)·(−logσ(z)) + m·e^(−z)."""
    z = spec.beta * x.margin
    mix = torch.sigmoid(z / spec.discopop_tau)
    return (1.0 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)


def _sft(x: VariantInputs, spec: LossSpec) -> Tensor:
    """NLL of the chosen completions, the generation term of MPO (Wang et al. 2024, arXiv:2411.10442).

    Like TRL (cross-entropy over all chosen tokens of the batch) it is a per-token mean: entry i is
    −log π(y_w,i) / mean_j |y_w,j|, so the batch mean is −Σ_i log π(y_w,i) / Σ_j |y_w,j|.
    """
    if x.chosen_lengths is None:
        raise ValueError("loss_type: 'sft' needs chosen_lengths (the policy's completion token counts)")
    return -x.policy_chosen / x.chosen_lengths.to(x.policy_chosen.dtype).mean().clamp(min=1.0)


def _sigmoid_norm(x: VariantInputs, spec: LossSpec) -> Tensor:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024, arXiv:2411.15124; SimPO-style normalisation of
    arXiv:2405.14734 with the reference kept): ℓ = −logσ(β·(s_w/|y_w| − s_l/|y_l|))."""
    return -F.logsigmoid(spec.beta * x.normalized_margin("sigmoid_norm"))


LossFn = Callable[[VariantInputs, LossSpec], Tensor]


def _registered_functions() -> dict[str, LossFn]:
    """``_<name>`` of this module for every variant of :data:`pipeline.loss_spec.VARIANTS` (where each variant's
    needs are declared): a variant is one function here plus its one entry there."""
    missing = [name for name in VARIANTS if f"_{name}" not in globals()]
    if missing:
        raise RuntimeError(f"loss variants {missing} are registered in pipeline.loss_spec but have no _<name> here")
    return {name: globals()[f"_{name}"] for name in VARIANTS}


LOSS_REGISTRY: dict[str, LossFn] = _registered_functions()


# ---------------------------------------------------------------------------------------------------------------
# Pure per-example functions
# ---------------------------------------------------------------------------------------------------------------


def _check_shapes(**tensors: Tensor | None) -> None:
    """Every given tensor must have the shape (B,) of the first."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    if first.dim() != 1:
        raise ValueError(f"{first_name}: expected shape (batch,), got {tuple(first.shape)}")
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {first_name} {tuple(first.shape)}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    ipo_length_normalized: bool = False,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    bco_delta: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One variant's per-example losses and the implicit rewards, all of shape (B,).

    Log-probs are summed over completion tokens, shape (B,); gradients flow to the policy log-probs only (the
    reference is detached). ``reference_free`` treats the reference log-probs as 0 in the loss. Rewards are
    β·(policy − reference) detached, with the reference as given (the original repository's and TRL's
    convention, also under reference_free). ``chosen_lengths``/``rejected_lengths`` (completion token counts,
    shape (B,)) are needed by sigmoid_norm, sft (chosen only) and ipo with ipo_length_normalized. ``bco_delta``
    is BCO's running reward mean δ (a scalar; :func:`compute_loss` keeps it in a :class:`LossState`).
    """
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type: dpo_loss takes one variant name, got {loss_type!r}; use compute_loss for MPO")
    spec = LossSpec(
        loss_type=(loss_type,),
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
        reference_free=reference_free,
        ipo_length_normalized=ipo_length_normalized,
    )
    return _variant_losses(
        spec,
        spec.loss_type[0],
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        bco_delta,
    )


def _variant_losses(
    spec: LossSpec,
    variant: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    bco_delta: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dpo_loss` with an already validated ``spec`` (what :func:`compute_loss` calls per micro-batch)."""
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    ref_chosen, ref_rejected = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    chosen_rewards = spec.beta * (policy_chosen_logps.detach() - ref_chosen)
    rejected_rewards = spec.beta * (policy_rejected_logps.detach() - ref_rejected)
    if spec.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(ref_chosen), torch.zeros_like(ref_rejected)

    def score(logratios: Tensor) -> Tensor:
        return f_divergence_scores(logratios, spec.f_divergence_type, spec.f_alpha_divergence_coef)

    inputs = VariantInputs(
        chosen=score(policy_chosen_logps - ref_chosen),
        rejected=score(policy_rejected_logps - ref_rejected),
        policy_margin=policy_chosen_logps - policy_rejected_logps,
        reference_margin=ref_chosen - ref_rejected,
        policy_chosen=policy_chosen_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        bco_delta=bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta,
    )
    return LOSS_REGISTRY[variant](inputs, spec), chosen_rewards, rejected_rewards


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
    reference_free: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The original DPO repository's ``preference_loss`` (eric-mitchell/direct-preference-optimization).

    Per-example (losses, chosen_rewards, rejected_rewards), shape (B,). ``ipo``: IPO, (h − 1/(2β))² on summed
    log-probs (label_smoothing ignored); otherwise DPO, or conservative DPO when label_smoothing > 0.
    ``reference_free`` drops the reference from the loss; the rewards still use it.
    """
    return dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        loss_type="ipo" if ipo else "sigmoid",
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
    )


def ld_dpo_logps(logps: Tensor, public_logps: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's desensitised log-prob (Liu et al. 2024, arXiv:2409.06411): public + α·(full − public).

    ``public_logps`` sums the first min(|y_w|, |y_l|) completion tokens of the pair, the rest is the "verbose"
    tail that α in [0, 1] down-weights (α = 1 is plain DPO). Shapes (B,).
    """
    return public_logps + ld_alpha * (logps - public_logps)


def wpo_weights(chosen_log_weights: Tensor, rejected_log_weights: Tensor) -> Tensor:
    """WPO pair weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2), detached, shape (B,).

    Inputs are each sequence's mean over completion tokens of log p(y_t) − log Σ_v p(v)²; the pair weight is
    exp(chosen + rejected), clamped at 1 as TRL 0.x does so that no pair outweighs the unweighted loss.
    """
    return torch.exp(torch.clamp(chosen_log_weights + rejected_log_weights, max=0.0)).detach()


# ---------------------------------------------------------------------------------------------------------------
# Training-loop entry point
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLogps:
    """Per-sequence log-prob statistics of B preference pairs, chosen then rejected; every tensor shape (B,).

    chosen, rejected: log-probs summed over completion tokens. *_lengths: completion token counts (sigmoid_norm,
    sft, length-normalised ipo read the policy's). *_public: sums over the first min(|y_w|, |y_l|) completion
    tokens of the pair (LD-DPO; needed on both sides). *_wpo_log_weights: policy only, WPO's per-sequence
    mean over completion tokens of log p(y_t) − logsumexp_v(2·log p(v)).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_public: Tensor | None = None
    rejected_public: Tensor | None = None
    chosen_wpo_log_weights: Tensor | None = None
    rejected_wpo_log_weights: Tensor | None = None

    def __post_init__(self) -> None:
        _check_shapes(**{f.name: getattr(self, f.name) for f in fields(self)})

    def require(self, *names: str, side: str, reason: str) -> tuple[Tensor, ...]:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{reason}: the {side} PairLogps lacks {', '.join(missing)}")
        return tuple(getattr(self, name) for name in names)


class LossState:
    """State carried across steps and saved in checkpoints: BCO's running reward mean δ.

    δ is the mean, over all steps so far, of each step's global-batch mean reward β·s (chosen and rejected);
    like TRL it includes the current batch. ``all_reduce_sum`` makes it identical on every data-parallel rank,
    and equal to one process seeing the whole global batch: a callable that returns the element-wise sum over
    ranks of a small float64 tensor (e.g. ``lambda t: (torch.distributed.all_reduce(t), t)[1]``); None for one
    process. Every :func:`compute_loss` call with this state updates δ; give evaluation a ``copy.deepcopy``.
    """

    def __init__(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        self._all_reduce_sum = all_reduce_sum
        self._bco_mean = torch.zeros((), dtype=torch.float64)
        self._bco_count = 0

    @property
    def bco_delta(self) -> Tensor:
        """The current δ, a float64 scalar tensor (0 before the first update)."""
        return self._bco_mean

    def update_bco(self, rewards: Tensor) -> Tensor:
        """Fold this rank's rewards (any shape) into δ and return the new δ; no host sync."""
        stats = torch.stack(
            [
                rewards.detach().sum().double(),
                torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device),
            ]
        )
        if self._all_reduce_sum is not None:
            stats = self._all_reduce_sum(stats)
        batch_mean = stats[0] / stats[1]
        self._bco_count += 1
        mean = self._bco_mean.to(batch_mean.device)
        self._bco_mean = mean + (batch_mean - mean) / self._bco_count
        return self._bco_mean

    def state_dict(self) -> dict:
        return {"bco_mean": float(self._bco_mean), "bco_count": self._bco_count}

    def load_state_dict(self, d: dict) -> None:
        if set(d) != {"bco_mean", "bco_count"} or not math.isfinite(d["bco_mean"]):
            raise ArtifactError(f"LossState: expected keys bco_mean and bco_count, got {sorted(d)}")
        count = d["bco_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ArtifactError(f"LossState: bco_count must be a count, got {count!r}")
        self._bco_mean = torch.tensor(float(d["bco_mean"]), dtype=torch.float64)
        self._bco_count = count


def compute_loss(
    policy: PairLogps, reference: PairLogps | None, spec: LossSpec, state: LossState | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss and its metrics for one (local) batch.

    Applies LD-DPO (``spec.ld_alpha``, to policy and reference alike) and WPO weighting (``spec.use_weighting``),
    then each variant of ``spec.loss_type`` through :func:`dpo_loss`. Loss = Σ_k w_k · mean_i(wpo_i · ℓ_k,i), with
    wpo_i = 1 without weighting. ``reference`` may be None only when ``spec.reference_free``; ``state`` is
    required by bco_pair. A field the spec needs that is None is a caller's bug: ValueError.

    Metrics are detached scalars, means over this batch (gather or average across ranks for logging):
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (the
    log-probs the loss sees, i.e. after LD-DPO), loss, and loss/<variant> (the term before its weight).
    """
    if reference is None:
        if not spec.reference_free:
            raise ValueError("reference_free: a reference is required unless reference_free is true")
        zeros = torch.zeros_like(policy.chosen).detach()
        reference = PairLogps(chosen=zeros, rejected=zeros, chosen_public=zeros, rejected_public=zeros)
    _check_shapes(policy=policy.chosen, reference=reference.chosen)

    chosen, rejected = policy.chosen, policy.rejected
    ref_chosen, ref_rejected = reference.chosen, reference.rejected
    if spec.ld_alpha is not None:
        reason = "ld_alpha (LD-DPO)"
        public_w, public_l = policy.require("chosen_public", "rejected_public", side="policy", reason=reason)
        ref_public_w, ref_public_l = reference.require(
            "chosen_public", "rejected_public", side="reference", reason=reason
        )
        chosen = ld_dpo_logps(chosen, public_w, spec.ld_alpha)
        rejected = ld_dpo_logps(rejected, public_l, spec.ld_alpha)
        ref_chosen = ld_dpo_logps(ref_chosen, ref_public_w, spec.ld_alpha)
        ref_rejected = ld_dpo_logps(ref_rejected, ref_public_l, spec.ld_alpha)

    weights = None
    if spec.use_weighting:
        weights = wpo_weights(
            *policy.require(
                "chosen_wpo_log_weights", "rejected_wpo_log_weights", side="policy", reason="use_weighting (WPO)"
            )
        )

    bco_delta: Tensor | float = 0.0
    if spec.needs("running_mean"):
        if state is None:
            raise ValueError("loss_type: bco_pair keeps a running reward mean; pass a LossState")
        ref_w, ref_l = (0.0, 0.0) if spec.reference_free else (ref_chosen.detach(), ref_rejected.detach())
        scores = f_divergence_scores(
            torch.cat([chosen - ref_w, rejected - ref_l]).detach(), spec.f_divergence_type, spec.f_alpha_divergence_coef
        )
        bco_delta = state.update_bco(spec.beta * scores)

    total: Tensor | float = 0.0
    metrics: dict[str, Tensor] = {}
    for name, weight in zip(spec.loss_type, spec.weights, strict=True):
        # SFT is the NLL of the whole chosen completion, so it reads the raw sums, not the LD-DPO ones.
        logps = (policy.chosen, policy.rejected) if name == "sft" else (chosen, rejected)
        losses, _, _ = _variant_losses(
            spec, name, *logps, ref_chosen, ref_rejected, policy.chosen_lengths, policy.rejected_lengths, bco_delta
        )
        term = (losses * weights).mean() if weights is not None else losses.mean()
        metrics[f"loss/{name}"] = term.detach()
        total = total + weight * term
    assert isinstance(total, Tensor), "LossSpec refuses an empty loss_type, so the loop ran at least once"

    chosen_rewards = spec.beta * (chosen - ref_chosen).detach()
    rejected_rewards = spec.beta * (rejected - ref_rejected).detach()
    metrics.update(
        {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
            "loss": total.detach(),
        }
    )
    return total, metrics

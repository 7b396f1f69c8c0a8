"""The loss settings: every variant's name and needs, and :class:`LossSpec`, validated once. No torch.

The config builds one :class:`LossSpec` when it is loaded (so a bad setting is refused before any stage runs,
in the driver or the Prefect process alike) and the training loop passes that object through; the math is in
:mod:`pipeline.losses`, one ``_<name>`` function per entry of :data:`VARIANTS`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """What a loss variant reads beyond the per-side scores, declared once (as open-instruct's loss enum does)."""

    paper: str
    lengths: bool = False  # completion token counts (sigmoid_norm; sft reads the chosen side only)
    smoothing: bool = False  # needs label_smoothing > 0 (its loss has log ε)
    raw_margins: bool = False  # compares policy and reference margins, which have no f-divergence score
    running_mean: bool = False  # keeps a reward mean across steps (a LossState, saved in checkpoints)


VARIANTS: dict[str, Variant] = {
    "sigmoid": Variant("DPO, arXiv:2305.18290"),
    "hinge": Variant("SLiC, arXiv:2305.10425"),
    "ipo": Variant("IPO, arXiv:2310.12036"),
    "exo_pair": Variant("EXO, arXiv:2402.00856", smoothing=True),
    "nca_pair": Variant("NCA, arXiv:2402.05369"),
    "robust": Variant("Robust DPO, arXiv:2403.00409"),
    "bco_pair": Variant("BCO, arXiv:2404.04656", running_mean=True),
    "sppo_hard": Variant("SPPO, arXiv:2405.00675"),
    "aot": Variant("AOT, arXiv:2406.05882", raw_margins=True),
    "aot_pair": Variant("AOT unpaired, arXiv:2406.05882"),
    "apo_zero": Variant("APO-zero, arXiv:2408.06266"),
    "apo_down": Variant("APO-down, arXiv:2408.06266"),
    "discopop": Variant("DiscoPOP, arXiv:2406.08414"),
    "sft": Variant("MPO's generation term, arXiv:2411.10442", lengths=True),
    "sigmoid_norm": Variant("Tulu 3 length-normalised DPO, arXiv:2411.15124", lengths=True),
}
# Other names accepted for a registered variant; a LossSpec stores the registered name.
LOSS_ALIASES: dict[str, str] = {"aot_unpaired": "aot_pair"}
LOSS_TYPES: tuple[str, ...] = (*VARIANTS, *LOSS_ALIASES)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _names(name: str, value: object, scalar: type) -> tuple:
    """A config value that may be one item or a list of items, as a tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, scalar):
        return (value,)
    raise ConfigError(f"{name}: expected one value or a list, got {value!r}")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LossSpec:
    """The loss configuration, with TRL ``DPOConfig``'s field names; validated on construction.

    ``loss_type`` may be a name or a list of names (MPO); it is stored as a tuple of registered names
    (aliases resolved). ``loss_weights`` is None (every term weighs 1) or one weight per loss type.
    ``ipo_length_normalized`` selects TRL 1.x's per-token IPO instead of the paper's summed form.
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    reference_free: bool = False
    use_weighting: bool = False
    ld_alpha: float | None = None
    ipo_length_normalized: bool = False

    def __post_init__(self) -> None:
        names = _names("loss_type", self.loss_type, str)
        if not names:
            raise ConfigError("loss_type: empty; give at least one of " + ", ".join(LOSS_TYPES))
        for name in names:
            if name not in LOSS_TYPES:
                raise ConfigError(f"loss_type: unknown {name!r}; valid: {', '.join(LOSS_TYPES)}")
        canonical = tuple(LOSS_ALIASES.get(name, name) for name in names)
        if len(set(canonical)) != len(canonical):
            raise ConfigError(f"loss_type: {list(names)} names a variant twice")
        object.__setattr__(self, "loss_type", canonical)

        if self.loss_weights is not None:
            weights = tuple(_real("loss_weights", w) for w in _names("loss_weights", self.loss_weights, numbers.Real))
            if len(weights) != len(canonical):
                raise ConfigError(f"loss_weights: {len(weights)} weights for {len(canonical)} loss types")
            if any(w < 0 for w in weights):
                raise ConfigError(f"loss_weights: must be >= 0, got {list(weights)}")
            object.__setattr__(self, "loss_weights", weights)

        for name in ("reference_free", "use_weighting", "ipo_length_normalized"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if _real("beta", self.beta) <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= _real("label_smoothing", self.label_smoothing) < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        smoothed = [name for name in canonical if VARIANTS[name].smoothing]
        if smoothed and self.label_smoothing == 0:
            raise ConfigError(f"label_smoothing: {smoothed[0]} needs label_smoothing > 0 (its loss has log(ε))")
        if _real("discopop_tau", self.discopop_tau) <= 0:
            raise ConfigError(f"discopop_tau: must be > 0, got {self.discopop_tau}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ConfigError(
                f"f_divergence_type: unknown {self.f_divergence_type!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}"
            )
        alpha = _real("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        if self.f_divergence_type == "alpha_divergence" and not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                "f_alpha_divergence_coef: must be in [0, 1] (0 = forward KL, 1 = reverse KL; "
                f"TRL 1.x convention), got {self.f_alpha_divergence_coef}"
            )
        on_margins = [name for name in canonical if VARIANTS[name].raw_margins]
        if on_margins and self.f_divergence_type != "reverse_kl":
            raise ConfigError(
                f"f_divergence_type: {on_margins[0]} compares policy and reference margins, which "
                f"have no f-divergence score; use reverse_kl or another loss_type"
            )
        if self.ld_alpha is not None and not 0.0 <= _real("ld_alpha", self.ld_alpha) <= 1.0:
            raise ConfigError(f"ld_alpha: must be in [0, 1] or null, got {self.ld_alpha}")

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (1.0 each when loss_weights is None)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)

    def needs(self, flag: str) -> bool:
        """Whether any variant of this spec declares ``flag`` (a :class:`Variant` field)."""
        return any(getattr(VARIANTS[name], flag) for name in self.loss_type)

"""The length rule: how a pair's token ids are cut to fit ``max_length``, as the TRL version a YAML was written
for cuts them (docs/truncation.md compares every rule on one example).

TRL changed its rule in v0.29.0, and a YAML says which TRL it was written for by its keys:

* **TRL >= 0.29** (no ``max_prompt_length`` / ``max_completion_length``; ``truncation_mode`` defaults to
  ``keep_start``): each sequence prompt + completion is cut to ``max_length``. keep_start keeps its first tokens
  (the completion's tail goes; a prompt that alone fills ``max_length`` leaves nothing to train on, and the row
  is skipped, as TRL >= 1.9 drops it). keep_end keeps its last tokens (the prompt's head goes).
* **TRL 0.14 - 0.28** (``max_prompt_length`` or ``max_completion_length`` set; ``truncation_mode`` defaults to
  ``keep_end``): first the prompt keeps its last ``max_prompt_length`` tokens whatever the mode and each
  completion its first ``max_completion_length``; then each sequence is cut to ``max_length`` as above.

Where this differs from TRL, on purpose: one prompt serves both completions here (the artifact stores it once),
so under keep_end it is cut as the longer sequence needs, where TRL cuts the shorter sequence's prompt less; and
a keep_end completion that alone fills ``max_length`` keeps the prompt's last token (the first completion token
needs a token before it to be scored), where TRL leaves none. The original DPO repository's rule is another:
it cuts the prompt only when the pair is too long, and then caps completions at
``max_length - max_prompt_length``; no TRL version since 0.12 does that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import DPOPipelineConfig

# The config fields the rule reads, so a new setting enters the tokenized fingerprint with it.
TRUNCATION_FIELDS = ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode")


@dataclass(frozen=True)
class Truncation:
    """The truncation settings of a config, ``truncation_mode`` resolved; :meth:`apply` is the rule."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str

    @classmethod
    def from_config(cls, config: DPOPipelineConfig) -> Truncation:
        limits = cls(config.max_length, config.max_prompt_length, config.max_completion_length, "")
        # An unset mode means what the YAML's TRL version defaulted to: keep_end before 0.29, keep_start since.
        default = "keep_end" if limits.rule == "trl<0.29" else "keep_start"
        return replace(limits, truncation_mode=config.truncation_mode or default)

    @property
    def rule(self) -> str:
        """Which TRL rule these settings select (recorded in the manifest)."""
        legacy = self.max_prompt_length is not None or self.max_completion_length is not None
        return "trl<0.29" if legacy else "trl>=0.29"

    def apply(
        self, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> tuple[list[int], list[int], list[int]] | None:
        """(prompt, chosen, rejected) cut by the rule, or None when nothing of a completion can be trained on."""
        if self.max_prompt_length is not None:
            prompt = prompt[-self.max_prompt_length :]  # TRL < 0.29 keeps the prompt's end whatever the mode
        if self.max_completion_length is not None:
            chosen, rejected = chosen[: self.max_completion_length], rejected[: self.max_completion_length]
        if self.max_length is None:
            return prompt, chosen, rejected
        limit = self.max_length
        if self.truncation_mode == "keep_start":
            room = limit - len(prompt)
            return (prompt, chosen[:room], rejected[:room]) if room > 0 else None
        overflow = len(prompt) + max(len(chosen), len(rejected)) - limit
        if overflow <= 0:
            return prompt, chosen, rejected
        if overflow < len(prompt):
            return prompt[overflow:], chosen, rejected
        if limit < 2:
            return None
        # The longer completion alone fills max_length: it keeps its end, after the prompt's last token.
        return prompt[-1:], chosen[-(limit - 1) :], rejected[-(limit - 1) :]

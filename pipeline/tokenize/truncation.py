"""The length rule: how a pair's token ids are cut to ``max_length`` / ``max_prompt_length`` /
``max_completion_length``, and how that relates to TRL's and the original DPO repo's rules."""

from __future__ import annotations

from dataclasses import dataclass, fields

from pipeline.config import DPOPipelineConfig


@dataclass(frozen=True)
class Truncation:
    """The truncation settings of a config; :meth:`apply` is the rule."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str

    @classmethod
    def from_config(cls, config: DPOPipelineConfig) -> Truncation:
        return cls(**config.subset(*TRUNCATION_FIELDS))

    def apply(self, prompt: list[int], chosen: list[int],
              rejected: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """The one truncation rule, the same for chosen and rejected (a null limit skips its step):

        1. A prompt longer than ``max_prompt_length`` keeps its first (``keep_start``) or last (``keep_end``)
           ``max_prompt_length`` tokens. keep_end keeps the text nearest the answer (and drops a leading BOS).
        2. A completion longer than ``max_completion_length`` keeps its first ``max_completion_length`` tokens.
        3. A completion with ``len(prompt) + len(completion) > max_length`` keeps its first
           ``max_length - len(prompt)`` tokens. If that is 0 or less (the prompt alone fills ``max_length``,
           possible only when ``max_prompt_length`` is null), returns None: the row is skipped as
           ``prompt_exceeds_max_length``.

        Completions always keep their start, the tokens that directly follow the prompt (a cut completion has
        no EOS). The original DPO repository differs: it cuts the prompt only when the pair is too long, and then
        gives completions ``max_length - max_prompt_length``.
        """
        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            keep_start = self.truncation_mode == "keep_start"
            prompt = prompt[:self.max_prompt_length] if keep_start else prompt[-self.max_prompt_length:]
        limit = self.max_completion_length
        if self.max_length is not None:
            room = self.max_length - len(prompt)
            if room <= 0:
                return None
            limit = room if limit is None else min(limit, room)
        if limit is None:
            return prompt, chosen, rejected
        return prompt, chosen[:limit], rejected[:limit]


# The config fields the rule reads: its dataclass fields, so a new setting enters the fingerprint with it.
TRUNCATION_FIELDS = tuple(f.name for f in fields(Truncation))

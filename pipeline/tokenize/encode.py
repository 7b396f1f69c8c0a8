"""Text or messages to token ids: the tokenizer and, for message lists, the chat template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError
from pipeline.tokenize.formats import CHAT_LAYOUTS, LAYOUTS


class Encoder:
    """Text or messages -> token ids, so that prompt ids + completion ids are exactly what training sees.

    Text layouts (standard, implicit_prompt_text): prompt = ``tokenizer(prompt)`` (with special tokens: the BOS
    a Llama tokenizer adds); completion = ``tokenizer(completion, add_special_tokens=False)`` + EOS. The
    :data:`.formats.CHAT_LAYOUTS` (message lists, and standard rows with a system turn): the prompt is the chat
    template's rendering with the generation prompt, the completion is the rendering of prompt + completion minus
    that prefix, both encoded without special tokens (the template carries BOS); EOS is appended only when the
    rendered completion does not already end with it."""

    def __init__(self, tokenizer, fmt: str, model_dir: Path, label: str):
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model_name_or_path: the tokenizer in {model_dir} has no eos_token")
        self.chat = fmt in CHAT_LAYOUTS
        if self.chat and not tokenizer.chat_template:
            if fmt == "standard_system":
                raise DataError(
                    f"{label}: dataset_columns maps a column to 'system', and a system turn needs the "
                    f"chat template, but the tokenizer in {model_dir} has no chat template (layout: "
                    f"{LAYOUTS[fmt]}; use a model whose tokenizer has one, or drop the system mapping)"
                )
            raise DataError(
                f"{label}: the rows are message lists, but the tokenizer in {model_dir} has no chat "
                f"template to render them (layout: {LAYOUTS[fmt]}; use a model whose tokenizer has one)"
            )
        self.tokenizer = tokenizer

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids if ids and ids[-1] == eos else ids + [eos]

    def _render(self, messages: list[dict], where: str, **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except TemplateError as exc:
            raise DataError(f"{where}: the chat template cannot render this row: {exc}") from None

    def _render_pair(self, prompt, chosen, rejected, where: str) -> tuple[str, str, str]:
        prompt_text = self._render(prompt, where, add_generation_prompt=True)
        completions: list[str] = []
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            full = self._render(prompt + messages, where)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{where}: field '{name}': the chat template renders prompt + {name} without the "
                    f"rendered prompt as its prefix, so the completion cannot be split off"
                )
            completions.append(full[len(prompt_text) :])
        chosen_text, rejected_text = completions
        return prompt_text, chosen_text, rejected_text

    def encode(self, pairs: Sequence[tuple[Any, Any, Any]], wheres: Sequence[str]) -> list[dict[str, list[int]]]:
        """Token ids of a batch of (prompt, chosen, rejected): batched, as the tokenizer is several times
        faster on lists than row by row."""
        texts = (
            [self._render_pair(*pair, where) for pair, where in zip(pairs, wheres, strict=True)] if self.chat else pairs
        )
        prompts, chosen, rejected = (list(column) for column in zip(*texts, strict=True))
        return [
            {"prompt": p, "chosen": self._with_eos(c), "rejected": self._with_eos(r)}
            for p, c, r in zip(
                self._ids(prompts, not self.chat), self._ids(chosen, False), self._ids(rejected, False), strict=True
            )
        ]

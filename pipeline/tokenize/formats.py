"""Row layouts: which format a split's rows have, and each row's prompt, chosen and rejected.

* standard:        ``prompt``, ``chosen``, ``rejected`` strings;
* conversational:  the same fields as lists of ``{role, content}`` messages, rendered with the chat template;
* implicit prompt: no ``prompt``; ``chosen``/``rejected`` are whole conversations whose longest common message
  prefix becomes the prompt.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")
# Why a well-formed row is skipped, in the order the checks run (a row counts once, under the first).
SKIP_REASONS = (
    "empty_prompt",                # prompt blank after strip; implicit prompt: the conversations share no message
    "empty_completion",            # chosen or rejected blank after strip
    "identical_completions",       # chosen == rejected: no preference to learn
    "prompt_exceeds_max_length",   # the prompt leaves no room for a completion token within max_length
    "identical_after_truncation",  # truncation cut away everything that told chosen and rejected apart
)


def detect_format(row: dict) -> str:
    """'standard', 'conversational' or 'implicit_prompt', from a split's first row."""
    if row.get("prompt") is None:
        return "implicit_prompt" if isinstance(row.get("chosen"), list) else "standard"
    return "conversational" if isinstance(row["prompt"], list) else "standard"


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string (standard format), got {type(value).__name__}")
    return value


def _messages_field(row: dict, name: str, where: str, fmt: str) -> list[dict]:
    value = row.get(name)
    if value is None:
        hint = " (implicit-prompt rows need 'chosen' and 'rejected')" if fmt == "implicit_prompt" else ""
        raise DataError(f"{where}: missing field '{name}'{hint}")
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of {{role, content}} messages ({fmt} format), "
                        f"got {type(value).__name__}")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field '{name}' message {i} must be {{role: str, content: str}}, "
                            f"got {str(message)[:80]}")
    return value


def extract(row: dict, fmt: str, where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): strings (standard) or message lists (conversational, implicit prompt)."""
    if fmt == "standard":
        return tuple(_text_field(row, name, where) for name in FIELDS)
    if fmt == "conversational":
        return tuple(_messages_field(row, name, where, fmt) for name in FIELDS)
    chosen = _messages_field(row, "chosen", where, fmt)
    rejected = _messages_field(row, "rejected", where, fmt)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_blank(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not message["content"].strip() for message in value)


def skip_reason(prompt, chosen, rejected) -> str | None:
    """The reason to skip a well-formed row before tokenizing, or None to keep it."""
    if _is_blank(prompt):
        return "empty_prompt"
    if _is_blank(chosen) or _is_blank(rejected):
        return "empty_completion"
    if chosen == rejected:
        return "identical_completions"
    return None

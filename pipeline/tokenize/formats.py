"""Row layouts: which layout a split's rows have, and each row's prompt, chosen and rejected.

The layouts of the public preference datasets, as they are on the Hub (``dataset_columns`` renames columns
first, e.g. ``{question: prompt}``):

* standard:                ``prompt``, ``chosen``, ``rejected`` strings (trl-lib's standard datasets);
* standard_system:         the same plus a ``system`` string that ``dataset_columns`` maps (Intel/orca_dpo_pairs),
                           rendered with the chat template as a system turn and a user turn;
* conversational:          the same fields as lists of ``{role, content}`` messages, rendered with the chat template;
* implicit_prompt:         no ``prompt``; ``chosen``/``rejected`` are whole conversations whose longest common
                           message prefix becomes the prompt (trl-lib/ultrafeedback_binarized);
* implicit_prompt_checked: a ``prompt`` string beside conversations that repeat it as their first user turn
                           (HuggingFaceH4/ultrafeedback_binarized): the conversations' own shared turns are the
                           prompt (they carry the roles and any system turn), checked against the string;
* implicit_prompt_text:    no ``prompt``; ``chosen``/``rejected`` are transcript strings (Anthropic/hh-rlhf) whose
                           common prefix becomes the prompt, cut as TRL's ``extract_prompt`` cuts strings.

The layout is detected once per split, from its first row: a split has one layout, and a later row of another
shape is an error that names the layout detected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError, DataError

FIELDS = ("prompt", "chosen", "rejected")
# How errors name each layout: what it is made of, so that a user can tell what was detected.
LAYOUTS = {
    "standard": "standard (prompt, chosen, rejected strings)",
    "standard_system": "standard with a system column (prompt, chosen, rejected, system strings)",
    "conversational": "conversational (prompt, chosen, rejected message lists)",
    "implicit_prompt": "implicit prompt (chosen, rejected message lists, no prompt)",
    "implicit_prompt_checked": "implicit prompt checked against a prompt string (chosen, rejected message lists "
    "that repeat the string prompt)",
    "implicit_prompt_text": "implicit prompt in transcript strings (chosen, rejected strings, no prompt)",
}
# The layouts rendered with the chat template; the others are plain text.
CHAT_LAYOUTS = frozenset({"standard_system", "conversational", "implicit_prompt", "implicit_prompt_checked"})
_TEXT_START = 40  # characters of a text quoted in an error
# Why a well-formed row is skipped, in the order the checks run (a row counts once, under the first).
SKIP_REASONS = (
    "empty_prompt",  # prompt blank after strip; implicit prompt: the conversations share no message
    "empty_completion",  # chosen or rejected blank after strip
    "identical_completions",  # chosen == rejected: no preference to learn
    "prompt_exceeds_max_length",  # the prompt leaves no room for a completion token within max_length
    "identical_after_truncation",  # truncation cut away everything that told chosen and rejected apart
)


# ---------------------------------------------------------------------------------------------- column mapping
def check_columns(mapping: Mapping[str, str] | None, columns: list[str], label: str) -> None:
    """Refuse, before any row is tokenized, a ``dataset_columns`` mapping that names a column the split lacks."""
    if not mapping:
        return
    by_role: dict[str, str] = {}
    for column, role in mapping.items():
        if role in by_role:
            raise ConfigError(
                f"dataset_columns: columns '{by_role[role]}' and '{column}' both map to '{role}'; "
                f"map one column per role"
            )
        by_role[role] = column
    for column in mapping:
        if column not in columns:
            raise DataError(
                f"{label}: dataset_columns maps column '{column}', which this split does not have; its "
                f"columns: {', '.join(columns) or 'none'} (fix the name in dataset_columns)"
            )


def rename(row: dict, mapping: Mapping[str, str]) -> dict:
    """The row with ``dataset_columns``' renames {column: role} applied at once, so that a swap such as
    {chosen: rejected, rejected: chosen} works; a column already named as a mapped role gives way to the mapped one."""
    renamed = {name: value for name, value in row.items() if name not in mapping and name not in mapping.values()}
    renamed.update({role: row.get(column) for column, role in mapping.items()})
    return renamed


# ---------------------------------------------------------------------------------------------- detection
def detect_format(row: dict, where: str, *, system: bool = False) -> str:
    """The layout (a :data:`LAYOUTS` key) of a split, from its first row; ``system``: dataset_columns maps a
    column to the system role."""
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if prompt is None:
        if isinstance(chosen, list):
            fmt = "implicit_prompt"
        elif isinstance(chosen, str):
            fmt = "implicit_prompt_text"
        else:
            raise DataError(
                f"{where}: no known layout: the row has no 'prompt' and no 'chosen' string or message "
                f"list (its columns: {', '.join(row) or 'none'}); map your columns with "
                f"dataset_columns, e.g. {{question: prompt, answer_good: chosen, answer_bad: rejected}}"
            )
    elif isinstance(prompt, list):
        fmt = "conversational"
    elif isinstance(chosen, list):
        fmt = "implicit_prompt_checked"
    else:
        fmt = "standard_system" if system else "standard"
    if system and fmt != "standard_system":
        raise DataError(
            f"{where}: dataset_columns maps a column to 'system', which only a string prompt with string "
            f"completions can use (layout: {LAYOUTS[fmt]}, detected from the split's first row; "
            f"remove the system mapping, or map a string column to prompt)"
        )
    return fmt


def _error(where: str, problem: str, fmt: str, fix: str) -> DataError:
    return DataError(f"{where}: {problem} (layout: {LAYOUTS[fmt]}, detected from the split's first row; {fix})")


def _required(row: dict, name: str, where: str, fmt: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _error(
            where,
            f"missing field '{name}'",
            fmt,
            f"every row needs '{name}'; name its column with dataset_columns: {{<column>: {name}}}",
        )
    return value


def _text_field(row: dict, name: str, where: str, fmt: str) -> str:
    value = _required(row, name, where, fmt)
    if not isinstance(value, str):
        raise _error(
            where,
            f"field '{name}' must be a string, got {type(value).__name__}",
            fmt,
            "every row needs the layout of the first row",
        )
    return value


def _messages_field(row: dict, name: str, where: str, fmt: str) -> list[dict]:
    value = _required(row, name, where, fmt)
    if not isinstance(value, list):
        raise _error(
            where,
            f"field '{name}' must be a list of {{role, content}} messages, got {type(value).__name__}",
            fmt,
            "every row needs the layout of the first row",
        )
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise _error(
                where,
                f"field '{name}' message {i} must be {{role: str, content: str}}, got {str(message)[:80]}",
                fmt,
                "fix the message",
            )
    return value


# ---------------------------------------------------------------------------------------------- extraction
def _shared_messages(chosen: list[dict], rejected: list[dict]) -> int:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _shared_chars(chosen: str, rejected: str) -> int:
    """The length of the strings' common prefix: a binary search over slice comparisons, which run in C (a
    character loop in Python would dominate the stage on long transcripts)."""
    low, high = 0, min(len(chosen), len(rejected))
    while low < high:
        middle = (low + high + 1) // 2
        if chosen.startswith(rejected[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


def text_prompt_cut(chosen: str, rejected: str) -> int:
    """Where TRL's ``extract_prompt`` cuts two transcript strings: at their first differing character, moved one
    back when the character before it is a space (the prompt then ends without it, and both completions start with
    it). Two differences from TRL, both for pairs that cannot train: strings that differ from their first character
    give an empty prompt (TRL looks at the last character there), and when one string is a prefix of the other the
    cut is at its end, leaving an empty completion (TRL cuts one character earlier)."""
    cut = _shared_chars(chosen, rejected)
    if 0 < cut < min(len(chosen), len(rejected)) and chosen[cut - 1] == " ":
        cut -= 1
    return cut


def _checked_prompt(row: dict, shared: list[dict], where: str, fmt: str) -> None:
    """The H4 layout's string prompt must be the content of the shared turns' last user turn: a row whose string
    disagrees would train on a prompt that is not the one the dataset names."""
    prompt = _text_field(row, "prompt", where, fmt)
    turns = [message["content"] for message in shared if message["role"] == "user"]
    if not turns:
        raise _error(
            where,
            "the conversations' shared turns hold no user turn to check field 'prompt' against",
            fmt,
            "fix the row, or leave the prompt column out (e.g. dataset_mixture columns: [chosen, rejected])",
        )
    if turns[-1].strip() != prompt.strip():
        raise _error(
            where,
            f"the conversations' last shared user turn does not match field 'prompt': the turn "
            f"starts {turns[-1].strip()[:_TEXT_START]!r}, the prompt starts "
            f"{prompt.strip()[:_TEXT_START]!r}",
            fmt,
            "fix the row, or leave the prompt column out (e.g. dataset_mixture columns: [chosen, rejected])",
        )


def extract(row: dict, fmt: str, where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): strings for the text layouts, message lists for :data:`CHAT_LAYOUTS`."""
    if fmt == "standard":
        prompt, chosen, rejected = (_text_field(row, name, where, fmt) for name in FIELDS)
        return prompt, chosen, rejected
    if fmt == "standard_system":
        prompt, chosen, rejected = (_text_field(row, name, where, fmt) for name in FIELDS)
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise _error(
                where,
                f"field 'system' must be a string, got {type(system).__name__}",
                fmt,
                "every row needs the layout of the first row",
            )
        # An empty system string (Intel/orca_dpo_pairs has many) is no system turn, not an empty one.
        turns = [{"role": "system", "content": system}] if system and system.strip() else []
        return (
            turns + [{"role": "user", "content": prompt}],
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
    if fmt == "conversational":
        prompt_turns, chosen_turns, rejected_turns = (_messages_field(row, name, where, fmt) for name in FIELDS)
        return prompt_turns, chosen_turns, rejected_turns
    if fmt == "implicit_prompt_text":
        chosen, rejected = (_text_field(row, name, where, fmt) for name in ("chosen", "rejected"))
        cut = text_prompt_cut(chosen, rejected)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    chosen_turns, rejected_turns = (_messages_field(row, name, where, fmt) for name in ("chosen", "rejected"))
    shared = _shared_messages(chosen_turns, rejected_turns)
    if fmt == "implicit_prompt_checked" and shared:
        _checked_prompt(row, chosen_turns[:shared], where, fmt)
    return chosen_turns[:shared], chosen_turns[shared:], rejected_turns[shared:]


def _is_blank(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    # System turns alone ask nothing: a prompt of only those is as empty as a blank one.
    return all(not message["content"].strip() for message in value if message["role"] != "system")


def skip_reason(prompt, chosen, rejected) -> str | None:
    """The reason to skip a well-formed row before tokenizing, or None to keep it."""
    if _is_blank(prompt):
        return "empty_prompt"
    if _is_blank(chosen) or _is_blank(rejected):
        return "empty_completion"
    if chosen == rejected:
        return "identical_completions"
    return None

"""The truncation rule: each TRL version's, chosen by the keys a YAML sets (pipeline/tokenize/truncation.py).

Expected values come from the rules as TRL states them, per sequence: ``(P + X)[:L]`` for keep_start and
``(P + X)[-L:]`` for keep_end (TRL >= 0.29), after ``P[-Lp:]`` and ``X[:Lc]`` for TRL < 0.29.
"""

import random

import pytest

from pipeline.config import load_config
from pipeline.tokenize.truncation import Truncation

P = list(range(1, 11))  # a 10-token prompt
C = list(range(20, 26))  # a 6-token chosen completion
R = [30, 31, 32]  # a 3-token rejected completion


def test_current_trl_keep_start_cuts_each_completions_tail_to_the_room_left():
    assert Truncation(12, None, None, "keep_start").apply(P, C, R) == (P, [20, 21], [30, 31])


@pytest.mark.parametrize("max_length, expected", [(10, None), (11, (P, [20], [30]))])
def test_current_trl_keep_start_skips_a_prompt_that_fills_max_length(max_length, expected):
    # TRL >= 1.9 drops rows whose prompt alone is max_length tokens: no completion token would be trained on.
    assert Truncation(max_length, None, None, "keep_start").apply(P, C, R) == expected


def test_current_trl_keep_end_cuts_the_prompts_head_for_the_longer_sequence():
    # (P + C)[-12:] drops the first 4 prompt tokens; the shorter rejected sequence shares that prompt.
    assert Truncation(12, None, None, "keep_end").apply(P, C, R) == (P[4:], C, R)


def test_keep_end_completion_filling_max_length_keeps_its_end_after_the_prompts_last_token():
    assert Truncation(5, None, None, "keep_end").apply(P, C, R) == ([10], C[-4:], R)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("keep_start", ([7, 8, 9, 10], [20, 21, 22, 23], R)),  # (P[-4:] + C[:5])[:8]
        ("keep_end", ([8, 9, 10], [20, 21, 22, 23, 24], R)),  # (P[-4:] + C[:5])[-8:]
    ],
)
def test_trl_before_029_cuts_prompt_end_and_completion_start_then_each_sequence(mode, expected):
    assert Truncation(8, 4, 5, mode).apply(P, C, R) == expected


def test_no_limits_is_identity_and_completion_limit_alone():
    assert Truncation(None, None, None, "keep_start").apply(P, C, R) == (P, C, R)
    assert Truncation(None, None, 2, "keep_end").apply(P, C, R) == (P, [20, 21], [30, 31])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_the_longer_sequence_is_exactly_trls(mode):
    """On random lengths, the longer sequence is TRL's per-sequence cut exactly; under keep_start the shorter
    one is too (the prompt is never cut there unless it fills max_length)."""
    rng = random.Random(0)
    for _ in range(500):
        prompt = list(range(rng.randint(1, 30)))
        chosen, rejected = [100 + i for i in range(rng.randint(1, 30))], [200 + i for i in range(rng.randint(1, 30))]
        limit = rng.randint(2, 50)
        cut = Truncation(limit, None, None, mode).apply(prompt, chosen, rejected)
        longer, shorter = (0, 1) if len(chosen) >= len(rejected) else (1, 0)
        sides = (chosen, rejected)
        trl = [(prompt + side)[:limit] if mode == "keep_start" else (prompt + side)[-limit:] for side in sides]
        if mode == "keep_start" and len(prompt) >= limit:
            assert cut is None
            continue
        ours = [cut[0] + cut[1], cut[0] + cut[2]]
        if mode == "keep_end" and len(sides[longer]) >= limit:
            assert ours[longer] == [prompt[-1], *sides[longer][-(limit - 1) :]]  # the one departure, documented
            continue
        assert ours[longer] == trl[longer]
        if mode == "keep_start":
            assert ours[shorter] == trl[shorter]


@pytest.mark.parametrize(
    "keys, rule, mode",
    [
        ({}, "trl>=0.29", "keep_start"),  # a TRL >= 0.29 YAML
        ({"max_prompt_length": 32}, "trl<0.29", "keep_end"),  # a TRL < 0.29 YAML
        ({"max_completion_length": 16}, "trl<0.29", "keep_end"),
        ({"max_prompt_length": 32, "truncation_mode": "keep_start"}, "trl<0.29", "keep_start"),
        ({"truncation_mode": "keep_end"}, "trl>=0.29", "keep_end"),
    ],
)
def test_a_yaml_means_what_its_trl_version_meant(keys, rule, mode):
    truncation = Truncation.from_config(load_config(None, {"max_length": 64, **keys}))
    assert (truncation.rule, truncation.truncation_mode) == (rule, mode)

"""Generate the shipped preference dataset (deterministic; rerunning rewrites identical files).

    python data/generate.py

What it is: short question/answer pairs about a small world of facts (the colour of a fruit, the sound of an
animal, the name of a young animal, the opposite of a word, the capital of a made-up country). Each pair's
*chosen* answer is correct, on topic, helpful and polite; its *rejected* answer breaks exactly one of those
rules, each a quarter of the pairs:

* ``wrong_fact``:   the same sentence with a wrong value ("a banana is blue .")
* ``off_topic``:    a correct fact about a different subject
* ``refusal``:      a polite non-answer ("i do not know .")
* ``rude``:         the correct fact, wrapped in a dismissive phrase and shouting

The rules are graded by how much a tiny randomly initialised model can learn from preferences alone in the
default run: the style rules (``rude``, ``refusal``) almost at once, ``off_topic`` (answer about the subject
named in the prompt) in a few hundred steps, ``wrong_fact`` (memorising the facts themselves) hardly at all
without pretraining. Held-out prompts are unseen phrasings of known facts, so held-out reward accuracy
measures generalisation, not recall of training prompts. (An earlier version also had ``a plus b`` facts,
100 of 137; a model that knows no arithmetic cannot rank those, which held eval accuracy near 0.65.)

Files: ``preference/train.jsonl`` (4000 pairs), ``preference/test.jsonl`` (400 held-out pairs, disjoint
prompts), standard format (``prompt``, ``chosen``, ``rejected`` strings); ``conversational_sample.jsonl``
(64 pairs as chat messages: ``prompt`` is a list of ``{role, content}``, ``chosen``/``rejected`` a one-message
assistant list).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Each category: (subject -> value, question phrasings, answer sentence, subject label); "{s}" is the subject and
# "{v}" the value. The last phrasing of every fact is held out for the test split.
CATEGORIES = [
    (
        {
            "banana": "yellow",
            "cherry": "red",
            "lime": "green",
            "plum": "purple",
            "orange": "orange",
            "blueberry": "blue",
            "lemon": "yellow",
            "grape": "purple",
            "kiwi": "brown",
            "apple": "red",
            "pear": "green",
            "coconut": "brown",
            "strawberry": "red",
            "mango": "orange",
            "fig": "purple",
        },
        ["what colour is a {s} ?", "tell me the colour of a {s} .", "which colour does a {s} have ?"],
        "a {s} is {v} .",
        "{s}",
    ),
    (
        {
            "dog": "barks",
            "cat": "meows",
            "cow": "moos",
            "sheep": "bleats",
            "duck": "quacks",
            "lion": "roars",
            "owl": "hoots",
            "horse": "neighs",
            "frog": "croaks",
            "snake": "hisses",
            "bee": "buzzes",
            "wolf": "howls",
        },
        ["what sound does a {s} make ?", "how does a {s} sound ?", "tell me what a {s} says ."],
        "a {s} {v} .",
        "{s}",
    ),
    (
        {
            "velmora": "tarsk",
            "quendia": "olm",
            "brisk": "fallow",
            "ostrel": "marn",
            "dunhar": "pell",
            "safrane": "ketch",
            "lorvik": "amsel",
            "torrin": "vey",
            "caldera": "rusk",
            "yomar": "idris",
        },
        ["what is the capital of {s} ?", "name the capital of {s} .", "which city is the capital of {s} ?"],
        "the capital of {s} is {v} .",
        "{s}",
    ),
    (
        {
            "cat": "kitten",
            "dog": "puppy",
            "cow": "calf",
            "sheep": "lamb",
            "duck": "duckling",
            "horse": "foal",
            "frog": "tadpole",
            "goat": "kid",
            "bear": "cub",
            "swan": "cygnet",
        },
        ["what is a baby {s} called ?", "name a young {s} .", "what do you call a baby {s} ?"],
        "a baby {s} is a {v} .",
        "young {s}",
    ),
    (
        {
            "hot": "cold",
            "big": "small",
            "fast": "slow",
            "up": "down",
            "open": "closed",
            "early": "late",
            "full": "empty",
            "light": "dark",
            "wet": "dry",
            "loud": "quiet",
            "old": "young",
            "hard": "soft",
        },
        ["what is the opposite of {s} ?", "give me the opposite of {s} .", "which word means the opposite of {s} ?"],
        "the opposite of {s} is {v} .",
        "{s}",
    ),
]

REFUSALS = ["i do not know .", "i can not answer that .", "no idea , sorry .", "ask someone else ."]
POLITE = ["sure .", "happy to help .", "good question .", "of course .", "glad you asked ."]
RUDE = ["ugh , obviously", "everyone knows", "stop asking , fine", "whatever ,", "duh ,"]


def _facts() -> list[tuple[str, list[str], str, list[str]]]:
    """Every fact as (subject, question phrasings, answer sentence, wrong answer sentences)."""
    facts = []
    for values, questions, answer, label in CATEGORIES:
        for subject, value in values.items():
            wrong = sorted({v for v in values.values() if v != value})
            facts.append(
                (
                    label.format(s=subject),
                    [q.format(s=subject) for q in questions],
                    answer.format(s=subject, v=value),
                    [answer.format(s=subject, v=w) for w in wrong],
                )
            )
    return facts


def _pair(rng: random.Random, fact, question: str, facts) -> dict[str, str]:
    subject, _, answer, wrong_answers = fact
    chosen = f"{rng.choice(POLITE)} {answer}"
    rule = rng.choice(["wrong_fact", "off_topic", "refusal", "rude"])
    if rule == "wrong_fact":
        rejected = f"{rng.choice(POLITE)} {rng.choice(wrong_answers)}"
    elif rule == "off_topic":
        other = rng.choice([f for f in facts if f[0] != subject])
        rejected = f"{rng.choice(POLITE)} {other[2]}"
    elif rule == "refusal":
        rejected = f"{rng.choice(POLITE)} {rng.choice(REFUSALS)}"
    else:
        rejected = f"{rng.choice(RUDE)} {answer.upper()}"
    return {"prompt": question, "chosen": chosen, "rejected": rejected}


def generate(n_train: int = 4000, n_test: int = 400, n_chat: int = 64, seed: int = 1234) -> None:
    rng = random.Random(seed)
    facts = _facts()
    # Held-out prompts: the last phrasing of every fact never appears in training, so the test split asks
    # known facts in unseen words.
    train_q = [(f, q) for f in facts for q in f[1][:2]]
    test_q = [(f, f[1][2]) for f in facts]
    train = [_pair(rng, *rng.choice(train_q), facts) for _ in range(n_train)]
    test = [_pair(rng, *rng.choice(test_q), facts) for _ in range(n_test)]
    chat = []
    for row in test[:n_chat]:
        chat.append(
            {
                "prompt": [
                    {"role": "system", "content": "answer briefly ."},
                    {"role": "user", "content": row["prompt"]},
                ],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        )
    out = HERE / "preference"
    out.mkdir(exist_ok=True)
    for path, rows in (
        (out / "train.jsonl", train),
        (out / "test.jsonl", test),
        (HERE / "conversational_sample.jsonl", chat),
    ):
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


if __name__ == "__main__":
    generate()

"""Generate the shipped preference dataset (deterministic; rerunning rewrites identical files).

    python data/generate.py

What it is: short question/answer pairs about a small world of facts (the colour of a fruit, the sound of an
animal, the sum of two small numbers, the capital of a made-up country). Each pair's *chosen* answer is
correct, on topic and polite; its *rejected* answer breaks exactly one of those rules:

* ``wrong_fact``:   the same sentence with a wrong value ("a banana is blue .")
* ``off_topic``:    a correct fact about a different subject
* ``rude``:         the correct fact, wrapped in a dismissive phrase and shouting

A tiny randomly initialised model learns the style and topic rules within a few hundred DPO steps, and the
facts recur across splits with other phrasings, so held-out reward accuracy measures something real.

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

FRUIT_COLOURS = {
    "banana": "yellow", "cherry": "red", "lime": "green", "plum": "purple", "orange": "orange",
    "blueberry": "blue", "lemon": "yellow", "grape": "purple", "kiwi": "brown", "apple": "red",
    "pear": "green", "coconut": "brown", "strawberry": "red", "mango": "orange", "fig": "purple",
}
ANIMAL_SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "sheep": "bleats", "duck": "quacks", "lion": "roars",
    "owl": "hoots", "horse": "neighs", "frog": "croaks", "snake": "hisses", "bee": "buzzes", "wolf": "howls",
}
CAPITALS = {
    "velmora": "tarsk", "quendia": "olm", "brisk": "fallow", "ostrel": "marn", "dunhar": "pell",
    "safrane": "ketch", "lorvik": "amsel", "torrin": "vey", "caldera": "rusk", "yomar": "idris",
}

POLITE = ["sure .", "happy to help .", "good question .", "of course .", "glad you asked ."]
RUDE = ["ugh , obviously", "everyone knows", "stop asking , fine", "whatever ,", "duh ,"]


def _facts() -> list[tuple[str, list[str], str, list[str]]]:
    """Every fact as (subject, question phrasings, answer sentence, wrong answer sentences)."""
    facts = []
    for fruit, colour in FRUIT_COLOURS.items():
        wrong = sorted({c for c in FRUIT_COLOURS.values() if c != colour})
        facts.append((fruit, [f"what colour is a {fruit} ?", f"tell me the colour of a {fruit} .",
                              f"which colour does a {fruit} have ?"],
                      f"a {fruit} is {colour} .", [f"a {fruit} is {w} ." for w in wrong]))
    for animal, sound in ANIMAL_SOUNDS.items():
        wrong = sorted({s for s in ANIMAL_SOUNDS.values() if s != sound})
        facts.append((animal, [f"what sound does a {animal} make ?", f"how does a {animal} sound ?",
                               f"tell me what a {animal} says ."],
                      f"a {animal} {sound} .", [f"a {animal} {w} ." for w in wrong]))
    for country, capital in CAPITALS.items():
        wrong = sorted({c for c in CAPITALS.values() if c != capital})
        facts.append((country, [f"what is the capital of {country} ?", f"name the capital of {country} .",
                                f"which city is the capital of {country} ?"],
                      f"the capital of {country} is {capital} .",
                      [f"the capital of {country} is {w} ." for w in wrong]))
    for a in range(10):
        for b in range(10):
            total = a + b
            facts.append((f"{a}+{b}", [f"what is {a} plus {b} ?", f"add {a} and {b} .", f"compute {a} + {b} ."],
                          f"{a} plus {b} is {total} .",
                          [f"{a} plus {b} is {w} ." for w in range(19) if w != total]))
    return facts


def _pair(rng: random.Random, fact, question: str, facts) -> dict[str, str]:
    subject, _, answer, wrong_answers = fact
    chosen = f"{rng.choice(POLITE)} {answer}"
    rule = rng.choice(["wrong_fact", "off_topic", "rude"])
    if rule == "wrong_fact":
        rejected = f"{rng.choice(POLITE)} {rng.choice(wrong_answers)}"
    elif rule == "off_topic":
        other = rng.choice([f for f in facts if f[0] != subject])
        rejected = f"{rng.choice(POLITE)} {other[2]}"
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
        chat.append({
            "prompt": [{"role": "system", "content": "answer briefly ."}, {"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        })
    out = HERE / "preference"
    out.mkdir(exist_ok=True)
    for path, rows in ((out / "train.jsonl", train), (out / "test.jsonl", test),
                       (HERE / "conversational_sample.jsonl", chat)):
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


if __name__ == "__main__":
    generate()

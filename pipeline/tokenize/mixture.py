"""``dataset_mixture``: which rows of which datasets make the train and eval splits, as alignment-handbook does.

The handbook's ``get_dataset`` loads each ``{id, config, split}``, keeps its ``columns``, shuffles it with
``seed`` and keeps the first ``int(rows * weight)`` rows, concatenates the datasets in order, shuffles the
whole with ``seed``, and holds out ``test_split_size`` rows with ``train_test_split(test_size, seed)``.
``datasets`` draws each of those permutations from a fresh ``numpy.random.default_rng(seed)``; so does this
module, so a handbook recipe trains on the very same rows in the very same order (``example_id`` = the row's
index in the handbook's train or test split).

Only the row counts are needed to know where every row goes: the rows themselves are then read once, in their
own order (streaming, whatever the datasets' size), each with its split and index; the stage sorts by index.
The assignment costs 8 bytes per row. Nothing here reads a file: :mod:`.sources` counts and reads the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np

from pipeline.config import DatasetMixture
from pipeline.errors import ConfigError, DataError


def check_settings(mixture: DatasetMixture) -> None:
    """Refuse settings that cannot make a mixture, before any dataset is opened (one line naming the field)."""
    if not mixture.datasets:
        raise ConfigError("dataset_mixture.datasets: name at least one dataset")
    for i, entry in enumerate(mixture.datasets):
        if not 0.0 < entry.weight <= 1.0:
            raise ConfigError(
                f"dataset_mixture.datasets[{i}].weight: the fraction of '{entry.id}' kept must be in "
                f"(0, 1], got {entry.weight}"
            )
    size = mixture.test_split_size
    if size is not None and (size <= 0 or (size >= 1 and size != int(size))):
        raise ConfigError(f"dataset_mixture.test_split_size: a row count (>= 1) or a fraction in (0, 1), got {size}")


def settings(mixture: DatasetMixture) -> dict[str, Any]:
    """What the tokenized fingerprint takes from the mixture besides the datasets' content: each dataset's
    config, split, columns and weight (its ``id`` enters through the content hash, so that a local path enters
    by content, not by spelling), the seed and the held-out size."""
    return {
        "datasets": [entry.model_dump(exclude={"id"}) for entry in mixture.datasets],
        "seed": mixture.seed,
        "test_split_size": mixture.test_split_size,
    }


@dataclass(frozen=True)
class Mixture:
    """The row counts and settings that decide the mixture; :meth:`ids` says where each row goes."""

    counts: tuple[int, ...]  # rows of each dataset, in the order of dataset_mixture.datasets
    weights: tuple[float, ...]
    seed: int
    test_rows: int  # rows held out as the eval split (0: no eval split)

    @classmethod
    def of(cls, mixture: DatasetMixture, counts: list[int]) -> Mixture:
        weights = tuple(entry.weight for entry in mixture.datasets)
        total = sum(kept_rows(n, w) for n, w in zip(counts, weights, strict=True))
        if total == 0:
            raise DataError(f"dataset_mixture: the weights keep no row of datasets of {counts} rows; raise a weight")
        size = mixture.test_split_size
        # datasets' train_test_split: a fraction holds out ceil(fraction * rows), a count that many rows.
        test = 0 if size is None else ceil(size * total) if size < 1 else int(size)
        if test >= total:
            raise DataError(
                f"dataset_mixture.test_split_size: {size} holds out {test} of the mixture's {total} rows, "
                f"leaving none to train on; hold out fewer"
            )
        return cls(tuple(counts), weights, mixture.seed, test)

    @property
    def total(self) -> int:
        return sum(kept_rows(n, w) for n, w in zip(self.counts, self.weights, strict=True))

    def rows(self, role: str) -> int:
        return self.test_rows if role == "eval" else self.total - self.test_rows

    def _permutation(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(n)

    def ids(self, role: str) -> list[np.ndarray]:
        """Per dataset, for each of its rows in its own order: the example_id it has in the ``role`` split
        ("train" or "eval"), or -1 when it is not in that split."""
        picked = [self._permutation(n)[: kept_rows(n, w)] for n, w in zip(self.counts, self.weights, strict=True)]
        total, test = self.total, self.test_rows
        # Position in train ++ eval of each row of the shuffled mixture (train_test_split's test rows come first
        # in its permutation, its train rows after them).
        if test:
            order = self._permutation(total)
            slot_of_shuffled = np.empty(total, dtype=np.int64)
            slot_of_shuffled[order[test:]] = np.arange(total - test)
            slot_of_shuffled[order[:test]] = np.arange(total - test, total)
        else:
            slot_of_shuffled = np.arange(total, dtype=np.int64)
        slot_of_concatenated = np.empty(total, dtype=np.int64)
        slot_of_concatenated[self._permutation(total)] = slot_of_shuffled
        low, high = (0, total - test) if role == "train" else (total - test, total)
        result, offset = [], 0
        for n, rows in zip(self.counts, picked, strict=True):
            slots = slot_of_concatenated[offset : offset + len(rows)]
            offset += len(rows)
            ids = np.full(n, -1, dtype=np.int64)
            inside = (slots >= low) & (slots < high)
            ids[rows[inside]] = slots[inside] - low
            result.append(ids)
        return result


def kept_rows(count: int, weight: float) -> int:
    """The handbook's ``int(len(ds) * weight)``: rounded down, so a weight never adds a row."""
    return int(count * weight)

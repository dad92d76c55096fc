"""Data types shared by every reader: labelled sentences, (pairs of) texts, and a task's splits.

The types are plain, immutable where it matters, and carry their provenance (``source`` is the
``path:line`` of the first token or row), so that any later error can point back into the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Task kinds; the kind decides the shape of ``TaskData.splits`` and of the encoded labels.
KINDS = ("labelling", "classification", "regression")


@dataclass(frozen=True)
class Sentence:
    """One labelled sequence (sequence labelling): one label per word."""

    words: tuple[str, ...]
    labels: tuple[str, ...]
    source: str  # "path:line" of the sentence's first token

    def __len__(self) -> int:
        return len(self.words)


@dataclass(frozen=True)
class Example:
    """One sentence or sentence pair (sequence classification or regression)."""

    text_a: str
    text_b: str | None
    label: str | float | None  # None only for rows of unlabelled files (GLUE test); never in a TaskData
    source: str  # "path:line"


@dataclass
class TaskData:
    """A task's splits, its train label vocabulary and how the splits were derived.

    ``labels`` is the vocabulary of the *train* split (sorted, class id = index); ``[]`` for
    regression. ``notes`` is JSON-serialisable and goes to ``results.json`` verbatim.
    """

    name: str
    kind: str  # "labelling" | "classification" | "regression"
    splits: dict[str, list]  # "train"/"dev"/"test" -> list[Sentence] or list[Example]
    labels: list[str]
    files: list[Path]
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskData.kind must be one of {KINDS}, got {self.kind!r}")

    def _split_labels(self, split: str) -> Iterator[str | float]:
        try:
            items = self.splits[split]
        except KeyError:
            raise KeyError(f"task {self.name} has no split {split!r}; it has {sorted(self.splits)}") from None
        if self.kind == "labelling":
            for sentence in items:
                yield from sentence.labels
        else:
            for example in items:
                yield example.label

    def encode_labels(self, split: str) -> tuple[np.ndarray, dict[str, int]]:
        """Class ids of a split (one per word, or one per example) and its labels unseen in train.

        A label missing from the train vocabulary gets an id ``>= len(self.labels)``, in order of
        first appearance in this split, and is counted in the returned ``{label: count}``. Probes
        cannot predict such ids, so they count as errors: nothing is dropped and nothing crashes.
        Regression returns float32 scores and ``{}``.
        """
        if self.kind == "regression":
            values = [float(v) for v in self._split_labels(split)]  # type: ignore[arg-type]
            return np.asarray(values, dtype=np.float32), {}
        index = {label: i for i, label in enumerate(self.labels)}
        n_seen = len(index)
        unseen: dict[str, int] = {}
        ids: list[int] = []
        for label in self._split_labels(split):
            class_id = index.get(label)  # type: ignore[arg-type]
            if class_id is None:  # first appearance of an unseen label: the next free id
                class_id = index[label] = len(index)  # type: ignore[index]
            if class_id >= n_seen:
                unseen[label] = unseen.get(label, 0) + 1  # type: ignore[index]
            ids.append(class_id)
        return np.asarray(ids, dtype=np.int64), unseen

    def unseen_labels(self) -> dict[str, dict[str, int]]:
        """``{split: {label: count}}`` of labels that the train vocabulary lacks (empty for train)."""
        if self.kind == "regression":
            return {split: {} for split in self.splits}
        vocab = set(self.labels)
        result: dict[str, dict[str, int]] = {}
        for split in self.splits:
            counts: dict[str, int] = {}
            for label in self._split_labels(split):
                if label not in vocab:
                    counts[label] = counts.get(label, 0) + 1  # type: ignore[index]
            result[split] = counts
        return result


def label_vocabulary(labels: Iterable[str]) -> list[str]:
    """The sorted set of labels: stable across runs and readable in reports."""
    return sorted(set(labels))

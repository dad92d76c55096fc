"""Data types shared by every reader: labelled sentences, (pairs of) texts, and a task's splits.

The types are plain, immutable where it matters, and carry their provenance (``source`` is the
``path:line`` of the first token or row), so that any later error can point back into the file.
"""

from __future__ import annotations

import hashlib
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

    def control_labels(self, split: str, seed: int) -> np.ndarray:
        """The control task of Hewitt & Liang (2019) for one split: class ids, one per word.

        Every word *type* (the exact word string) gets one label, drawn from the empirical
        distribution of the train labels (token counts), by :func:`control_label_ids`: a
        deterministic function of ``(seed, type)``, so a type has the same label in every split,
        types unseen in train follow the same rule, and nothing needs to be stored. Labelling
        tasks only (a control task relabels word types).
        """
        if self.kind != "labelling":
            raise ValueError(
                f"task {self.name} is a {self.kind} task; control tasks relabel word types, so they are "
                "defined for word-level (labelling) tasks only"
            )
        train_ids, _ = self.encode_labels("train")
        counts = np.bincount(train_ids, minlength=len(self.labels))
        words = [w for sentence in self.splits[split] for w in sentence.words]
        return control_label_ids(words, counts, seed)

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


def type_uniform(word: str, seed: int) -> float:
    """A uniform draw in [0, 1) that depends only on ``(seed, word)``: the first 8 bytes of
    BLAKE2b over both, as a 64-bit integer / 2**64 (53 bits kept, as for a float64)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{word}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def control_label_ids(words: Iterable[str], counts: np.ndarray, seed: int) -> np.ndarray:
    """Control-task class ids for a sequence of words (Hewitt & Liang 2019).

    ``counts[k]`` is how often class ``k`` occurs in train; a word type's label is the class whose
    cumulative share contains :func:`type_uniform` ``(word, seed)`` (inverse-CDF sampling from the
    empirical train distribution). Each type is hashed once.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or counts.sum() <= 0 or np.any(counts < 0):
        raise ValueError(
            f"control labels need non-negative train label counts with a positive sum, got {counts}"
        )
    cdf = np.cumsum(counts) / counts.sum()
    cdf[-1] = 1.0
    cache: dict[str, int] = {}
    ids = []
    for word in words:
        label = cache.get(word)
        if label is None:
            # searchsorted 'right': u in [cdf[k-1], cdf[k]) -> k; classes with no train token never drawn
            label = cache[word] = int(np.searchsorted(cdf, type_uniform(word, seed), side="right"))
        ids.append(label)
    return np.asarray(ids, dtype=np.int64)

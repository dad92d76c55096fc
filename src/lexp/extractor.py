"""The reduced extractor: what LayerSelector + CCFS leave of the model, saved so users can tag text.

A folder holds the encoder truncated to its first k layers (``encoder/``, safetensors + tokenizer),
the selected neuron columns and the trained probe (``probe.safetensors``) and a small
``manifest.json``. No pickle; loading never runs remote code.

    from lexp.extractor import ReducedExtractor
    tagger = ReducedExtractor.load("outputs/.../extractor")
    tagger.tag([["The", "cat", "sat", "."]])     # -> [["DT", "NN", "VBD", "."]]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lexp.errors import LexpInputError

FORMAT = "lexp-reduced-extractor/1"


def save_reduced_extractor(
    path: Path,
    *,
    model: Any,
    tokenizer: Any,
    n_layers_kept: int,
    columns: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    labels: Sequence[str],
    kind: str,
    settings: Mapping[str, Any],
) -> Path:
    """Save a truncated encoder + neuron columns + probe into ``path`` (written atomically).

    ``model`` must already be truncated so that its hidden states are layers 0..n_layers_kept-1;
    ``columns`` index the layer-major concatenation of those layers.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "encoder")
    save_file(
        {
            "columns": np.ascontiguousarray(columns, dtype=np.int64),
            "weight": np.ascontiguousarray(weights, dtype=np.float32),
            "bias": np.ascontiguousarray(bias, dtype=np.float32),
        },
        str(tmp / "probe.safetensors"),
    )
    manifest = {
        "format": FORMAT,
        "n_layers_kept": int(n_layers_kept),
        "n_neurons": int(len(columns)),
        "labels": list(labels),
        "kind": kind,
        "settings": dict(settings),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


@dataclass
class ReducedExtractor:
    """A truncated encoder, a neuron index and a linear probe: tags words (or classifies sentences)."""

    model: Any
    tokenizer: Any
    columns: np.ndarray
    weight: torch.Tensor
    bias: torch.Tensor
    labels: list[str]
    kind: str
    settings: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> ReducedExtractor:
        from safetensors.numpy import load_file
        from transformers import AutoModel, AutoTokenizer

        from lexp.encoders.loading import load_pretrained

        path = Path(path)
        if (path / "extractor" / "manifest.json").exists():  # a run directory was given
            path = path / "extractor"
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise LexpInputError(
                f"{path}: no reduced extractor here (missing manifest.json). Pass the run directory of "
                "`python -m lexp.run analysis=pipeline`, or its extractor/ folder."
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise LexpInputError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
        tensors = load_file(str(path / "probe.safetensors"))
        model = load_pretrained(AutoModel, path / "encoder", trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "encoder", trust_remote_code=False)
        return cls(
            model=model,
            tokenizer=tokenizer,
            columns=tensors["columns"],
            weight=torch.from_numpy(tensors["weight"]),
            bias=torch.from_numpy(tensors["bias"]),
            labels=list(manifest["labels"]),
            kind=manifest["kind"],
            settings=manifest["settings"],
        )

    def _scores(self, features: np.ndarray) -> torch.Tensor:
        dtype = self.settings.get("store_dtype", "float32")
        x = torch.from_numpy(features[:, self.columns].astype(dtype).astype(np.float32))
        return x @ self.weight.T + self.bias

    def features(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> np.ndarray:
        """Word vectors of the selected neurons, in input order (one row per word)."""
        from lexp.encoders.extract import extract_words

        lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out = None
        for index, rows in extract_words(
            self.model,
            self.tokenizer,
            sentences,
            batch_size=batch_size,
            subword=self.settings.get("subword", "last"),
            long_sentences=self.settings.get("long_sentences", "error"),
            progress=False,
        ):
            if out is None:
                out = np.empty((int(offsets[-1]), rows.shape[1]), dtype=np.float32)
            out[offsets[index] : offsets[index + 1]] = rows
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def tag(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[str]]:
        """One label per word of every sentence (sequence-labelling extractors)."""
        if self.kind != "labelling":
            raise LexpInputError(f"this extractor was trained for a {self.kind} task; use classify()")
        feats = self.features(sentences, batch_size)
        ids = self._scores(feats).argmax(dim=1).numpy() if len(feats) else np.empty(0, dtype=np.int64)
        out, start = [], 0
        for sentence in sentences:
            out.append([self.labels[i] for i in ids[start : start + len(sentence)]])
            start += len(sentence)
        return out

    def classify(self, pairs: Sequence[tuple[str, str | None]], batch_size: int = 32) -> list[Any]:
        """One label (or score, for regression) per sentence / sentence pair."""
        from lexp.encoders.extract import extract_cls

        if self.kind == "labelling":
            raise LexpInputError("this extractor tags words; use tag()")
        feats = np.zeros((len(pairs), 0), dtype=np.float32)
        for index, row in extract_cls(
            self.model,
            self.tokenizer,
            pairs,
            batch_size=batch_size,
            max_length=int(self.settings.get("max_length", 128)),
            progress=False,
        ):
            if feats.shape[1] == 0:
                feats = np.zeros((len(pairs), row.shape[-1]), dtype=np.float32)
            feats[index] = row
        scores = self._scores(feats)
        if self.kind == "regression":
            return scores[:, 0].tolist()
        return [self.labels[i] for i in scores.argmax(dim=1).tolist()]

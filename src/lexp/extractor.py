"""The reduced extractor: what LayerSelector + CCFS leave of the model, saved so users can tag text.

A folder holds the encoder truncated to its first k layers (``encoder/``, safetensors + tokenizer),
the selected neuron columns and the trained probe (``probe.safetensors``) and a small
``manifest.json``. No pickle; loading never runs remote code.

    from lexp.extractor import ReducedExtractor
    tagger = ReducedExtractor.load("outputs/.../extractor", device="auto")
    tagger.tag([["The", "cat", "sat", "."]])     # -> [["DT", "NN", "VBD", "."]]

``load(..., device=...)`` puts the encoder, the neuron index and the probe on one device; the
selected neurons are gathered and scored there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
    drop_final_norm: bool = False,
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
        # a decoder truncated to fewer layers skips its final norm (lexp.redundancy.timing.
        # drop_final_norm); the config cannot say so: the model is saved whole and load() drops it
        "final_norm": "identity" if drop_final_norm else "model",
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


#: Rows scored per probe call on the device (features of the selected neurons only).
_SCORE_ROWS = 8192


@dataclass
class ReducedExtractor:
    """A truncated encoder, a neuron index and a linear probe: tags words (or classifies sentences).

    Everything lives on one ``device``: the encoder, the probe's weights and the neuron index; the
    selected columns are gathered and scored there, and only label ids come back to the CPU.
    """

    model: Any
    tokenizer: Any
    columns: torch.Tensor  # int64 column indices into the kept layers' activations, on ``device``
    weight: torch.Tensor  # (K, C) float32 on ``device``
    bias: torch.Tensor  # (K,) float32 on ``device``
    labels: list[str]
    kind: str
    settings: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> ReducedExtractor:
        """Load a saved extractor onto ``device`` (auto | cpu | cuda | cuda:N; None: the CPU).

        Every missing or unreadable part is one LexpInputError naming the file and the fix.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        from lexp.device import resolve_device
        from lexp.encoders.loading import load_encoder_weights

        target = torch.device("cpu") if device is None else resolve_device(device)
        path = Path(path)
        if (path / "extractor" / "manifest.json").exists():  # a run directory was given
            path = path / "extractor"
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise LexpInputError(
                f"{path}: no reduced extractor here (missing manifest.json). Pass the run directory of "
                "`python -m lexp.run analysis=pipeline`, or its extractor/ folder."
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise LexpInputError(
                f"{manifest_path}: not a readable JSON manifest ({exc}). Re-run the pipeline."
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise LexpInputError(f"{manifest_path}: format {got!r} is not {FORMAT!r}")
        probe_path, encoder_dir = path / "probe.safetensors", path / "encoder"
        for needed, what in ((probe_path, "the probe"), (encoder_dir, "the truncated encoder")):
            if not needed.exists():
                raise LexpInputError(
                    f"{needed}: missing ({what} of this extractor); the folder is incomplete. Fix: re-run "
                    "`python -m lexp.run analysis=pipeline` (analysis.save_extractor=true) to write it again."
                )
        try:
            tensors = load_file(str(probe_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LexpInputError(
                f"{probe_path}: not a readable safetensors file ({exc}). Re-run the pipeline."
            ) from None
        missing = sorted({"columns", "weight", "bias"} - set(tensors))
        if missing:
            raise LexpInputError(
                f"{probe_path}: lacks tensor(s) {missing}. Re-run the pipeline to write it again."
            )
        model = load_encoder_weights(encoder_dir).eval().to(target)
        if manifest.get("final_norm") == "identity":
            from lexp.redundancy.timing import drop_final_norm

            drop_final_norm(model)
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir, trust_remote_code=False)
        _check_parts(manifest_path, probe_path, manifest, tensors, model.config)
        return cls(
            model=model,
            tokenizer=tokenizer,
            columns=torch.as_tensor(tensors["columns"], dtype=torch.int64, device=target),
            weight=torch.as_tensor(tensors["weight"], dtype=torch.float32, device=target),
            bias=torch.as_tensor(tensors["bias"], dtype=torch.float32, device=target),
            labels=list(manifest["labels"]),
            kind=manifest["kind"],
            settings=manifest["settings"],
            device=target,
        )

    def _selected(self, rows: np.ndarray) -> torch.Tensor:
        """The selected neurons of activation rows, gathered on the device, rounded through the store
        dtype the probe was trained on (float16 by default), as float32."""
        store_dtype = getattr(torch, str(self.settings.get("store_dtype", "float32")))
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        return x.index_select(1, self.columns).to(store_dtype).float()

    def _scores(self, rows: np.ndarray) -> torch.Tensor:
        return torch.addmm(self.bias, self._selected(rows), self.weight.T)

    def _store_extraction(self) -> dict[str, Any]:
        """The store's batching and arithmetic (``extract_words``/``extract_cls`` keywords): other
        batch shapes change rows by float rounding, bf16-mixed by ~1e-2, either enough to flip a
        near-tie after the float16 cast."""
        return {
            "max_tokens": self.settings.get("max_tokens"),
            "precision": str(self.settings.get("precision", "32")),
        }

    def _word_rows(
        self,
        sentences: Sequence[Sequence[str]],
        batch_size: int,
        long_sentences: str | None,
        sources: Sequence[str] | None,
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Activation rows of the kept layers in chunks of whole sentences: (sentence ids, rows)."""
        from lexp.encoders.extract import extract_words

        ids: list[int] = []
        blocks: list[np.ndarray] = []
        n = 0
        for index, rows in extract_words(
            self.model,
            self.tokenizer,
            sentences,
            batch_size=batch_size,
            subword=self.settings.get("subword", "last"),
            long_sentences=long_sentences or self.settings.get("long_sentences", "error"),
            progress=False,
            sources=sources,
            **self._store_extraction(),
        ):
            ids.append(index)
            blocks.append(rows)
            n += len(rows)
            if n >= _SCORE_ROWS:
                yield ids, np.concatenate(blocks)
                ids, blocks, n = [], [], 0
        if ids:
            yield ids, np.concatenate(blocks)

    def features(
        self,
        sentences: Sequence[Sequence[str]],
        batch_size: int = 32,
        *,
        long_sentences: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Word vectors of the selected neurons, in input order (one row per word), float32."""
        lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out = np.empty((int(offsets[-1]), int(self.columns.numel())), dtype=np.float32)
        for ids, rows in self._word_rows(sentences, batch_size, long_sentences, sources):
            selected = self._selected(rows).cpu().numpy()
            at = 0
            for i in ids:
                out[offsets[i] : offsets[i + 1]] = selected[at : at + lengths[i]]
                at += int(lengths[i])
        return out

    def tag(
        self,
        sentences: Sequence[Sequence[str]],
        batch_size: int = 32,
        *,
        long_sentences: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """One label per word of every sentence (sequence-labelling extractors).

        ``long_sentences``: ``error`` | ``window`` (None: the setting the extractor was built with);
        ``sources``: ``"path:line"`` per sentence, named in errors.
        """
        if self.kind != "labelling":
            raise LexpInputError(f"this extractor was trained for a {self.kind} task; use classify()")
        out: list[list[str]] = [[] for _ in sentences]
        for ids, rows in self._word_rows(sentences, batch_size, long_sentences, sources):
            predicted = self._scores(rows).argmax(dim=1).cpu().numpy()
            at = 0
            for i in ids:
                k = len(sentences[i])
                out[i] = [self.labels[j] for j in predicted[at : at + k]]
                at += k
        return out

    def classify(self, pairs: Sequence[tuple[str, str | None]], batch_size: int = 32) -> list[Any]:
        """One label (or score, for regression) per sentence / sentence pair."""
        from lexp.encoders.extract import extract_cls

        if self.kind == "labelling":
            raise LexpInputError("this extractor tags words; use tag()")
        feats: np.ndarray | None = None
        for index, row in extract_cls(
            self.model,
            self.tokenizer,
            pairs,
            batch_size=batch_size,
            max_length=int(self.settings.get("max_length", 128)),
            progress=False,
            sentence=str(self.settings.get("sentence") or "cls"),
            **self._store_extraction(),
        ):
            if feats is None:
                feats = np.zeros((len(pairs), row.shape[-1]), dtype=np.float32)
            feats[index] = row
        if feats is None:
            return []
        scores = self._scores(feats)
        if self.kind == "regression":
            return scores[:, 0].cpu().tolist()
        return [self.labels[i] for i in scores.argmax(dim=1).cpu().tolist()]


def _check_parts(
    manifest_path: Path,
    probe_path: Path,
    manifest: dict[str, Any],
    tensors: dict[str, np.ndarray],
    config: Any,
) -> None:
    """The saved parts agree: one weight row per label, one weight column per selected neuron, and
    every neuron index inside the truncated encoder's layers × hidden. A hand-edited or mixed-up
    extractor is one LexpInputError here, not an IndexError in the middle of a prediction."""
    kind, labels = manifest.get("kind"), manifest.get("labels")
    if kind not in ("labelling", "classification", "regression") or not isinstance(labels, list):
        raise LexpInputError(
            f"{manifest_path}: kind {kind!r} / labels {type(labels).__name__} are not an extractor's"
        )
    columns, weight, bias = tensors["columns"], tensors["weight"], tensors["bias"]
    n_neurons = (int(config.num_hidden_layers) + 1) * int(config.hidden_size)
    rows = 1 if kind == "regression" else len(labels)
    problems = []
    if columns.ndim != 1 or not np.issubdtype(columns.dtype, np.integer):
        problems.append(f"columns is {columns.dtype} {columns.shape}, not a 1-D integer index")
    elif columns.size and (columns.min() < 0 or columns.max() >= n_neurons):
        problems.append(
            f"columns run from {columns.min()} to {columns.max()}; the encoder has {n_neurons} neurons "
            f"({int(config.num_hidden_layers) + 1} layers × {int(config.hidden_size)})"
        )
    if weight.ndim != 2 or weight.shape != (rows, columns.shape[0] if columns.ndim == 1 else -1):
        problems.append(f"weight is {weight.shape}, expected ({rows} labels, {columns.shape[0]} columns)")
    if bias.shape != (rows,):
        problems.append(f"bias is {bias.shape}, expected ({rows},)")
    if problems:
        raise LexpInputError(
            f"{probe_path}: {'; '.join(problems)} (manifest.json lists {len(labels)} labels). The extractor "
            "was edited or its files mixed up. Fix: re-run `python -m lexp.run analysis=pipeline` to write it again."
        )

"""Which hidden states a run keeps (``model.layers``), and the one mapping between a store's column
blocks and the model's layer numbers.

A store of a layer subset holds only the kept layers' columns, block j = the model's layer
``layer_ids[j]``; every table, figure and results.json field names the model's layer numbers.
Pure Python/numpy: lexp.schema and the memory plan use it before torch is imported.

``model.layers``:
- ``null`` / ``all``: every hidden state (embeddings = 0 .. num_hidden_layers);
- a list, e.g. ``[0,4,8]``: exactly these layers (sorted; nothing is added);
- ``every:N``: 0, N, 2N, ... and always the last layer (the model's output), e.g. a 12-layer
  model with ``every:4`` keeps 0, 4, 8, 12 and with ``every:5`` keeps 0, 5, 10, 12.
A subset that names every layer is the full model (same store, same fingerprint).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lexp.errors import LexpInputError

_EVERY = re.compile(r"^every:(\d+)$")


def spec_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a ``model.layers`` value (None: it is one); no model needed."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        m = _EVERY.match(spec.strip())
        if m is None:
            return "a string that is neither 'all' nor 'every:N'"
        return None if int(m.group(1)) >= 1 else "every:0 keeps no layer"
    if not isinstance(spec, list | tuple):
        return "not a list, 'every:N' or null"
    if not spec:
        return "an empty list"
    bad = [x for x in spec if isinstance(x, bool) or not isinstance(x, int) or x < 0]
    if bad:
        return f"holds {bad[0]!r}, not a layer number >= 0"
    if len(set(spec)) != len(spec):
        twice = next(x for i, x in enumerate(spec) if x in spec[:i])
        return f"holds layer {twice} twice"
    return None


def resolve_layers(spec: Any, n_model_layers: int, *, where: str = "the model") -> list[int] | None:
    """The model layer numbers a run keeps, sorted (None: all ``n_model_layers`` hidden states,
    the embeddings included). A layer beyond the model's depth is one LexpInputError naming it."""
    problem = spec_problem(spec)
    if problem is not None:
        raise LexpInputError(
            f"model.layers={spec!r} is invalid: {problem}. Fix: e.g. model.layers=[0,4,8], "
            "model.layers=every:4 or model.layers=null (all layers)"
        )
    if spec is None or spec == "all":
        return None
    top = int(n_model_layers) - 1
    if isinstance(spec, str):
        step = int(_EVERY.match(spec.strip()).group(1))  # type: ignore[union-attr]
        kept = sorted(set(range(0, top + 1, step)) | {top})
    else:
        kept = sorted(int(x) for x in spec)
        beyond = [x for x in kept if x > top]
        if beyond:
            raise LexpInputError(
                f"model.layers={list(spec)} names layer {beyond[0]}, but {where} has {top} layers + the "
                f"embeddings (hidden states 0..{top}). Fix: keep layers between 0 and {top}, e.g. "
                f"model.layers=every:{max(1, top // 3)}"
            )
    return None if kept == list(range(top + 1)) else kept


def contiguous(layer_ids: Sequence[int]) -> bool:
    """Whether the layers are neighbours (l, l+1, ...): what layerdrop's d(l, l+n) needs."""
    ids = list(layer_ids)
    return ids == list(range(ids[0], ids[0] + len(ids))) if ids else True


def neuron_layers(layer_ids: Sequence[int], hidden: int) -> np.ndarray:
    """The model layer number of every store column (block j → ``layer_ids[j]``)."""
    return np.repeat(np.asarray(layer_ids, dtype=np.int64), int(hidden))


def model_columns(columns: np.ndarray | Sequence[int], layer_ids: Sequence[int], hidden: int) -> np.ndarray:
    """Store column indices → column indices of the full model's hidden states (layer l's unit u is
    ``l * hidden + u``): what a reduced extractor reads from its truncated encoder."""
    cols = np.asarray(columns, dtype=np.int64)
    ids = np.asarray(layer_ids, dtype=np.int64)
    return ids[cols // int(hidden)] * int(hidden) + cols % int(hidden)


#: config.json names of the width and the depth across families (GPT-2: n_embd/n_layer,
#: DistilBERT: dim/n_layers, T5: d_model/num_layers); transformers maps them onto hidden_size and
#: num_hidden_layers, lexp reads them without importing transformers.
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def config_shape(folder: Any) -> tuple[int, int] | None:
    """(hidden states incl. the embeddings, hidden size) of the model in ``folder``, from its
    config.json alone (milliseconds: no torch, no transformers); None when the file does not say
    (callers then ask transformers' AutoConfig)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    width = next((config[k] for k in _WIDTH_KEYS if isinstance(config.get(k), int)), None)
    depth = next((config[k] for k in _DEPTH_KEYS if isinstance(config.get(k), int)), None)
    if not width or not depth:
        return None
    return int(depth) + 1, int(width)

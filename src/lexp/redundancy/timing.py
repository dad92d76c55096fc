"""Efficiency analysis (Section 7.2, Appendix A.5.2): forward-pass and classifier timings.

* :func:`truncate_encoder` keeps the first ``k`` transformer layers of a Hugging Face encoder
  (``k = 0``: embeddings only), sharing the weights with the full model.
* :func:`forward_time` / :func:`forward_speedups` time the forward pass per sentence of the
  full and the truncated encoders (the LayerSelector speed-up of Figures 10 and 11);
  :func:`forward_flops` counts the FLOPs of one batch, a deterministic proxy for the same.
* :func:`classifier_timing` times training and inference of a logistic-regression probe as a
  function of the number of features (Figure 5: 100,000 tokens, 10 epochs).

All times are wall-clock seconds (``time.perf_counter``), medians over repeats after a warm-up.
They depend on the machine and its load; the shell records them, nothing here asserts on them.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lexp.device import synchronize
from lexp.errors import LexpInputError, LexpModelError

__all__ = [
    "classifier_timing",
    "encoder_depth",
    "forward_flops",
    "forward_speedups",
    "forward_time",
    "time_call",
    "truncate_encoder",
]

Batch = Mapping[str, torch.Tensor]

# Where Hugging Face encoders keep their list of transformer layers, relative to the base model.
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("encoder", "layer"),  # BERT, RoBERTa, ELECTRA, MiniLM, ...
    ("layer",),  # XLNet
    ("transformer", "layer"),  # DistilBERT; XLNet heads (prefix "transformer")
    ("h",),  # GPT-2
    ("layers",),  # Llama, Qwen2, Mistral, Gemma, ModernBERT
    ("encoder", "albert_layer_groups"),  # ALBERT: shared layer groups, looped num_hidden_layers times
    ("encoder", "block"),  # T5's encoder (T5EncoderModel)
)
#: Layer lists whose length is not the depth: the model loops over them config.num_hidden_layers times.
_SHARED_LAYERS = frozenset({("encoder", "albert_layer_groups")})
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers")


def time_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)``; return its result and the elapsed wall-clock seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Truncated encoders
# ---------------------------------------------------------------------------------------------


def _layer_path(model: nn.Module) -> tuple[str, ...]:
    prefixes: list[tuple[str, ...]] = [()]
    base = getattr(model, "base_model_prefix", "")
    if base and isinstance(getattr(model, base, None), nn.Module):
        prefixes.append((base,))
    for prefix in prefixes:
        for path in _LAYER_PATHS:
            node: Any = model
            for name in prefix + path:
                node = node._modules.get(name) if isinstance(node, nn.Module) else None
            if isinstance(node, nn.ModuleList):
                return prefix + path
    raise LexpModelError(
        f"cannot truncate {type(model).__name__}: no transformer layer list at "
        f"{', '.join('.'.join(p) for p in _LAYER_PATHS)} (also tried under base_model_prefix {base!r}); "
        "supported are BERT-like (encoder.layer), XLNet (layer), DistilBERT (transformer.layer), decoder (h, layers) "
        "and T5 encoder (encoder.block) models — "
        "for another architecture, time the full model or add its layer path to lexp.redundancy.timing._LAYER_PATHS"
    )


def _shared(path: tuple[str, ...]) -> bool:
    return any(path[len(path) - len(s) :] == s for s in _SHARED_LAYERS)


def encoder_depth(model: nn.Module) -> int:
    """Number of transformer layers of ``model`` (the embeddings not counted)."""
    path = _layer_path(model)
    if _shared(path):
        return int(model.config.num_hidden_layers)
    node: Any = model
    for name in path:
        node = node._modules[name]
    return len(node)


def _clone_structure(module: nn.Module, config: Any, new_config: Any) -> nn.Module:
    """Copy of the module tree that shares parameter and buffer tensors but no containers.

    Every module gets its own ``_modules``/``_parameters``/hook dictionaries, so replacing a layer
    list — or hooks that transformers installs lazily to record hidden states — in the copy never
    touches the original model. References to the original config are redirected to the copy's.
    """
    clone = copy.copy(module)
    for key, value in list(clone.__dict__.items()):
        if isinstance(value, dict | set | list):
            clone.__dict__[key] = copy.copy(value)
        elif config is not None and value is config:
            clone.__dict__[key] = new_config
    clone._modules = {
        name: None if child is None else _clone_structure(child, config, new_config)
        for name, child in module._modules.items()
    }
    return clone


def truncate_encoder(model: nn.Module, k: int, *, final_norm: bool = False) -> nn.Module:
    """The encoder with only its first ``k`` transformer layers (``k = 0``: embeddings only).

    Its ``last_hidden_state`` equals ``hidden_states[k]`` of the full model. Weights are shared
    (no extra memory); the full model is left untouched. The config copy reports ``k`` layers.
    A final norm (decoders, ModernBERT) is dropped for k < depth (`drop_final_norm`), so that the
    last state equals the full model's state k; ``final_norm=True`` keeps it (a model to save: its
    weights stay complete, and the reduced extractor drops it on loading).
    """
    depth = encoder_depth(model)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= depth:
        raise LexpInputError(
            f"truncate_encoder: k = {k!r} must be an integer in [0, {depth}] "
            f"(number of transformer layers to keep; {type(model).__name__} has {depth})"
        )
    config = getattr(model, "config", None)
    new_config = copy.deepcopy(config) if config is not None else None
    for key in _DEPTH_KEYS:
        if new_config is not None and isinstance(getattr(new_config, key, None), int):
            setattr(new_config, key, int(k))
    clone = _clone_structure(model, config, new_config)
    *parents, name = _layer_path(clone)
    owner: Any = clone
    for part in parents:
        owner = owner._modules[part]
    if not _shared((*parents, name)):  # ALBERT: the copy's config.num_hidden_layers alone truncates
        owner._modules[name] = nn.ModuleList(list(owner._modules[name])[: int(k)])
    for key in _DEPTH_KEYS:  # e.g. XLNetModel.n_layer
        if getattr(owner, key, None) == depth:
            setattr(owner, key, int(k))
    if new_config is not None and isinstance(getattr(new_config, "layer_types", None), list):
        new_config.layer_types = new_config.layer_types[: int(k)]  # Qwen2, Gemma: one entry per layer
    if int(k) < depth and not final_norm:
        drop_final_norm(clone)
    if int(k) == 0:
        _check_runs_without_layers(clone)
    return clone


def _check_runs_without_layers(model: nn.Module) -> None:
    """One clear error for an encoder whose forward cannot run with zero layers (transformers'
    DeBERTa-v2 encoder returns a variable set only inside its layer loop), instead of its
    UnboundLocalError somewhere in the pipeline."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=_model_device(model))
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    except (UnboundLocalError, IndexError) as exc:
        raise LexpModelError(
            f"{type(model).__name__} cannot run with zero transformer layers (embeddings only): "
            f"{type(exc).__name__}: {exc}. The pipeline's timing and a LayerSelector choice of layer 0 "
            "need that. Fix: analysis.timing.enabled=false, or use analysis=layers/neurons/general."
        ) from None


def drop_final_norm(model: nn.Module) -> str | None:
    """Replace the final norm of a decoder (GPT-2 ``ln_f``, Llama ``norm``, ModernBERT
    ``final_norm``) by the identity, in place; returns its attribute name or None.

    The norm is applied to the last layer's output only, so hidden state k of the full model is
    un-normalised for every k < depth: a model truncated to k layers must not normalise its last
    state either, or it would not reproduce the store's activations of layer k.
    """
    from lexp.encoders.families import final_norm_name

    base: Any = model
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        base = getattr(model, prefix)
    name = final_norm_name(base)
    if name is not None:
        parent, _, attr = name.rpartition(".")  # T5: encoder.final_layer_norm
        base.get_submodule(parent)._modules[attr] = nn.Identity()
    return name


# ---------------------------------------------------------------------------------------------
# Forward-pass timing
# ---------------------------------------------------------------------------------------------


def _n_sentences(batches: Sequence[Batch]) -> int:
    total = 0
    for i, batch in enumerate(batches):
        tensor = batch.get("input_ids")
        if tensor is None:
            tensor = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        if tensor is None or tensor.ndim == 0:
            raise LexpInputError(
                f"timing: batch {i + 1} holds no tensor; pass tokenizer outputs (input_ids, ...)"
            )
        total += int(tensor.shape[0])
    if total == 0:
        raise LexpInputError("timing: no sentences to time; pass at least one non-empty batch")
    return total


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _run(model: nn.Module, batches: Sequence[Batch]) -> None:
    """One timed pass: every batch through the model, finished (CUDA runs asynchronously)."""
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    synchronize(_model_device(model))


def forward_speedups(
    model: nn.Module,
    batches: Sequence[Batch],
    layer_counts: Sequence[int],
    *,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Forward time per sentence of the full model and of each truncation in ``layer_counts``.

    The models are timed in rotation within each repeat, so that slow drifts of the machine
    affect them alike. The batches are moved to the model's device once, before any clock runs,
    and every timed pass waits for the device to finish. Returns one record per model — the full
    model first — with ``n_layers``, ``seconds`` (median total), ``seconds_per_sentence``,
    ``runs`` (all totals) and ``speedup`` = full / this model.
    """
    if repeats < 1 or warmup < 0:
        raise LexpInputError(f"timing: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    n_sentences = _n_sentences(batches)
    device = _model_device(model)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    depth = encoder_depth(model)
    was_training = model.training
    model.eval()
    try:
        models = [(depth, model)] + [(int(k), truncate_encoder(model, int(k))) for k in layer_counts]
        for _, m in models:
            for _ in range(warmup):
                _run(m, batches[:1])
        runs: list[list[float]] = [[] for _ in models]
        with _bar(repeats * len(models), "time forward pass", progress) as bar:
            for _ in range(repeats):
                for i, (_, m) in enumerate(models):
                    runs[i].append(time_call(_run, m, batches)[1])
                    bar.update(1)
    finally:
        model.train(was_training)
    full = statistics.median(runs[0])
    records = []
    for (k, _), r in zip(models, runs, strict=True):
        seconds = statistics.median(r)
        records.append(
            {
                "n_layers": k,
                "n_sentences": n_sentences,
                "seconds": seconds,
                "seconds_per_sentence": seconds / n_sentences,
                "runs": r,
                "speedup": full / seconds if seconds > 0 else float("inf"),
            }
        )
    return records


def forward_time(
    model: nn.Module,
    batches: Sequence[Batch],
    n_layers: int | None = None,
    *,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Forward time per sentence with the encoder truncated to ``n_layers`` (None: full model).

    The record also carries the full model's time and the ``speedup`` (full / truncated), as in
    Appendix A.5.2: total seconds over all batches divided by the number of sentences.
    """
    if n_layers is None:
        return forward_speedups(model, batches, [], repeats=repeats, warmup=warmup)[0]
    full, truncated = forward_speedups(model, batches, [n_layers], repeats=repeats, warmup=warmup)
    return {**truncated, "full_seconds_per_sentence": full["seconds_per_sentence"]}


def forward_flops(model: nn.Module, batch: Batch, n_layers: int | None = None) -> int:
    """FLOPs of one forward pass over ``batch`` (torch's FLOP counter), full or truncated.

    A deterministic stand-in for wall-clock speed-ups: it grows linearly with the number of
    layers kept, whatever the load of the machine.
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = model if n_layers is None else truncate_encoder(model, n_layers)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        m(**batch)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Classifier timing (Figure 5)
# ---------------------------------------------------------------------------------------------


def classifier_timing(
    n_rows: int = 100_000,
    feature_counts: Sequence[int] = (100, 300, 1000, 3000, 9984),
    n_classes: int = 2,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    repeats: int = 3,
    seed: int = 0,
    pool_rows: int = 8192,
    lr: float = 1e-3,
    l1: float = 1e-5,
    l2: float = 1e-5,
    steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train and inference time of the paper's probe versus the number of input features (Fig. 5).

    The probe is the analysis' own: one :class:`lexp.probes.FusedHeads` head stepped by
    :class:`lexp.probes.ElasticNetAdam` (cross-entropy + ``l1``·Σ|W| + ``l2``·‖W‖₂, Adam), on
    ``device`` — exactly the step every probe of a run takes, so the figure times the code that
    runs. A training pass is ``epochs`` passes of ``batch_size``-row minibatches over ``n_rows``
    rows; inference is one batched pass over the same rows. Cost does not depend on the values, so
    rows cycle through a seeded random pool of ``pool_rows`` rows instead of materialising
    ``n_rows × features`` floats (100,000 × 9,984 float32 would be 4 GB).

    ``steps`` (optional) times only that many Adam steps per run and scales the time to the full
    ``epochs × ceil(n_rows / batch_size)`` steps (a step's cost does not depend on the data, so the
    scaling is linear); records say so (``train_steps_timed``). The first run is a warm-up.
    Returns one record per feature count with median ``train_seconds`` and ``predict_seconds``
    and all runs.
    """
    from lexp.probes import ElasticNetAdam, FusedHeads

    for name, value in (("n_rows", n_rows), ("n_classes", n_classes), ("epochs", epochs)):
        if value < 1:
            raise LexpInputError(f"classifier_timing: {name} = {value} must be positive")
    if batch_size < 1 or repeats < 1 or pool_rows < 1 or not feature_counts or min(feature_counts) < 1:
        raise LexpInputError(
            "classifier_timing: batch_size, repeats, pool_rows and every feature count must be positive"
        )
    if steps is not None and steps < 1:
        raise LexpInputError(f"classifier_timing: steps = {steps} must be positive (or None: every step)")
    device = torch.device("cpu") if device is None else torch.device(device)
    pool_rows = max(batch_size, pool_rows // batch_size * batch_size)  # batches never wrap around
    total_steps = epochs * -(-n_rows // batch_size)
    timed_steps = total_steps if steps is None else min(int(steps), total_steps)
    generator = torch.Generator().manual_seed(seed)
    records = []
    with _bar(len(feature_counts) * (repeats + 1), "time probe vs features", progress) as bar:
        for n_features in feature_counts:
            X = torch.randn(pool_rows, int(n_features), generator=generator).to(device)
            y = torch.randint(0, n_classes, (pool_rows,), generator=generator).to(device)
            train_runs, predict_runs = [], []
            for r in range(repeats + 1):  # run 0 is the warm-up
                heads = FusedHeads([np.arange(int(n_features))], n_classes, seed + r).to(device)
                optimizer = ElasticNetAdam(heads, lr, l1=l1, l2=l2)
                _, t_train = time_call(_train_steps, heads, optimizer, X, y, timed_steps, batch_size)
                _, t_predict = time_call(_predict, heads, X, n_rows, batch_size)
                if r:
                    train_runs.append(t_train * total_steps / timed_steps)
                    predict_runs.append(t_predict)
                bar.update(1)
            records.append(
                {
                    "n_features": int(n_features),
                    "n_rows": int(n_rows),
                    "epochs": int(epochs),
                    "train_steps": int(total_steps),
                    "train_steps_timed": int(timed_steps),
                    "device": str(device),
                    "train_seconds": statistics.median(train_runs),
                    "predict_seconds": statistics.median(predict_runs),
                    "train_runs": train_runs,
                    "predict_runs": predict_runs,
                }
            )
    return records


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not enabled)


def _train_steps(
    heads: Any, optimizer: Any, X: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int
) -> None:
    """``steps`` probe steps over the cycled pool: data gradient, then ElasticNet + Adam in the update."""
    pool = X.shape[0]
    for step in range(steps):
        start = step * batch_size % pool
        heads.loss_and_grad(
            X[start : start + batch_size],
            y[start : start + batch_size],
            l1=optimizer.l1,
            l2=optimizer.l2,
            regression=False,
            penalty=False,
        )
        optimizer.update()
    synchronize(X.device)


def _predict(heads: Any, X: torch.Tensor, n_rows: int, batch_size: int) -> None:
    pool = X.shape[0]
    with torch.inference_mode():
        for start in range(0, n_rows, batch_size):
            at = start % pool
            heads(X[at : at + min(batch_size, n_rows - start)]).argmax(dim=1)
    synchronize(X.device)

"""Batched activation extraction: one vector per word (sequence labelling) or per example ([CLS]).

Both extractors tokenise the whole input in one fast-tokenizer call, sort the sequences by length
(so a batch holds sequences of similar length and little padding), run each batch once under
`torch.inference_mode()` with all hidden states, and gather the wanted token rows of every layer
with one indexing operation per layer. The rows are laid out layer-major: column
``layer * hidden + unit``, layer 0 = the embedding layer, exactly as in the paper (13 x 768 = 9,984
neurons for BERT-base).

Word alignment comes from the fast tokenizer's ``word_ids()`` with ``is_split_into_words=True``,
so it does not depend on the padding side (XLNet pads on the left) nor on the tokenizer's
subword marker. Nothing is dropped or truncated silently: every word gets exactly one row, words
that tokenise to nothing are encoded as the unknown token (and counted), and sentences longer than
the model maximum either raise a `LexpInputError` or are encoded in overlapping windows.

Device: the extractors run on the device of the model's weights (move the model first; nothing
here assumes the CPU). The wanted rows of every layer are gathered on that device into one
float32 buffer per batch, which reaches the host in ONE copy. On CUDA that copy is asynchronous,
on a side stream, into pinned memory, and the host reads a batch only after the next batch's
forward has been queued (double buffering): the copy of batch i overlaps the forward of batch
i+1. On the CPU the gather writes straight into the returned array, as before (no extra copy).
Batches are cut by sentence count (``batch_size``) or by a budget of padded tokens
(``max_tokens``; ``"auto"``: `GPU_MAX_TOKENS` on CUDA, sentence batches on the CPU).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lexp.device import exact_float32_matmul
from lexp.encoders.loading import model_max_tokens
from lexp.errors import LexpInputError, LexpModelError

__all__ = [
    "SUBWORD_MODES",
    "PRECISIONS",
    "GPU_MAX_TOKENS",
    "batch_plan",
    "LONG_SENTENCE_POLICIES",
    "Extraction",
    "ExtractionStats",
    "extract_words",
    "extract_cls",
    "plan_windows",
    "cls_position",
]

log = logging.getLogger(__name__)

SUBWORD_MODES = ("last", "first", "average")
PRECISIONS = ("32", "bf16-mixed")
LONG_SENTENCE_POLICIES = ("error", "window")
_SHOW = 5  # offenders named in messages
#: Padded tokens per forward for ``max_tokens="auto"`` on CUDA: 32 EWT sentences (~800 tokens) leave
#: a large GPU idle; 32K tokens is what the issue's H100 reference used. BERT-base keeps 1.3 GB of
#: hidden states per batch (32768 x 768 x 13 float32) plus one layer's transients: a few GB.
GPU_MAX_TOKENS = 32768
#: What the hidden states of one forward may hold (all layers are kept until the batch is gathered):
#: ``auto`` cuts a batch's padded tokens to this over `state_bytes_per_token`. Only wide models
#: meet it: BERT-base's 32 sentences of 512 tokens hold 0.65 GB; a 16 × 2048 decoder's first EWT
#: test batch (32 × 380 tokens, one 380-token "word") held 1.7 GB of states and raised the run from
#: 1.9 to 6.1 GB of memory during its forward (benchmarks/bench_wide.py decoder, full dev/test).
CPU_STATE_BYTES = 1 << 30
GPU_STATE_BYTES = 8 << 30
#: The CPU keeps sentence batches unless ``batch_size`` sentences of this many tokens would pass
#: `CPU_STATE_BYTES` (so MiniLM, BERT-base and XLNet-base batch exactly as before).
_CPU_REFERENCE_TOKENS = 512


@dataclass
class ExtractionStats:
    """Counts and timing of one extraction, filled in while it is iterated."""

    n_items: int = 0  # sentences (words) or examples (cls) requested
    n_words: int = 0  # rows produced by extract_words
    n_tokens: int = 0  # real subword tokens fed to the model (incl. special tokens)
    n_padded_tokens: int = 0  # tokens incl. padding: n_padded_tokens / n_tokens = padding overhead
    n_batches: int = 0
    n_windowed: int = 0  # sentences encoded in several windows (long_sentences="window")
    n_windows: int = 0
    n_unk_words: int = 0  # words that tokenised to nothing and were encoded as the unk token
    n_truncated: int = 0  # examples truncated to max_length (extract_cls only)
    layers_run: int | None = None  # ``layers``: the forward pass stopped after this layer (None: all)
    seconds: float = 0.0  # wall time spent inside the iteration

    @property
    def words_per_second(self) -> float:
        return self.n_words / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_ratio(self) -> float:
        """Padded tokens per real token (1.0: no padding); what token budgets keep low."""
        return self.n_padded_tokens / self.n_tokens if self.n_tokens > 0 else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts (a store manifest's ``extraction`` entry) incl. the derived rates."""
        out: dict[str, Any] = asdict(self)
        if self.layers_run is None:  # every layer ran: the manifest of a full store as before
            del out["layers_run"]
        out["seconds"] = round(self.seconds, 3)
        out["padding_ratio"] = round(self.padding_ratio, 4)
        out["words_per_second"] = round(self.words_per_second, 1)
        return out


class Extraction(Iterator[tuple[int, np.ndarray]]):
    """Iterator over ``(index, activations)`` that also exposes `ExtractionStats` as ``.stats``.

    Validation and tokenisation happen when the extractor is called (errors surface at once);
    forward passes happen lazily, batch by batch, while iterating. ``batches()`` gives the same
    items grouped by forward batch (a list per batch), for consumers that hand work on per batch
    (the background store writer); use one way of iterating, not both.
    """

    def __init__(
        self,
        run: Callable[[ExtractionStats], Iterator[list[tuple[int, np.ndarray]]]],
        stats: ExtractionStats,
    ):
        self.stats = stats
        self._batches = run(stats)
        self._items: Iterator[tuple[int, np.ndarray]] | None = None

    def __iter__(self) -> Extraction:
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        if self._items is None:
            self._items = (item for batch in self._batches for item in batch)
        return next(self._items)

    def batches(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        """The items grouped by forward batch: ``[(index, activations), ...]`` per batch."""
        if self._items is not None:
            raise RuntimeError("Extraction.batches(): this extraction is already being iterated item by item")
        return self._batches

    def close(self) -> None:
        self._batches.close()


# --------------------------------------------------------------------------------------------
# Helpers shared by both extractors
# --------------------------------------------------------------------------------------------


def _hidden_states(output: Any, layers: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Every layer's states, embeddings first (``layers``: only these model layers, in that order;
    ``model.layers``). transformers 5's BERT records them at the layers' inputs, so an encoder
    truncated to its embeddings (a reduced extractor with LayerSelector layer 0) returns none: its
    one state is then ``last_hidden_state``."""
    states = output.hidden_states
    states = tuple(states) if states else (output.last_hidden_state,)
    return states if layers is None else tuple(states[layer] for layer in layers)


def _forward_options(model: torch.nn.Module) -> tuple[bool, dict[str, Any]]:
    """Whether to pass token_type_ids, and extra forward kwargs (XLNet: no mems)."""
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
    if "use_mems" in params:
        extra["use_mems"] = False  # mems would only copy every hidden state; lexp never reuses them
    # Segment ids are passed whenever the model has segment parameters: XLNet was pre-trained with
    # them (<cls> has its own segment) although transformers 5's XLNet tokenizer omits them by default.
    from lexp.encoders.families import takes_segments

    return takes_segments(model), extra


@contextlib.contextmanager
def _inference(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for one forward; the caller's mode is restored, so
    a model being fine-tuned is never left in eval mode between two yielded rows.

    ``precision="bf16-mixed"`` runs the matrix products in bfloat16 (autocast): several times faster
    on CPUs with AVX-512-BF16, at the cost of ~1e-2 absolute error in the activations.
    On CUDA, ``precision="32"`` really is float32: TF32 matrix products (``torch.set_float32_matmul_
    precision("high")``, which some scripts set globally) are switched off for the forward and the
    setting is restored after it (:func:`lexp.device.exact_float32_matmul`), so GPU rows equal CPU
    rows within 1e-4.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    try:
        with exact_float32_matmul(device.type == "cuda" and precision == "32"):
            with torch.inference_mode(), autocast:
                yield
    finally:
        model.train(was_training)


def _rows_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float16"):
        raise LexpInputError(f"rows_dtype={name!r} is not one of ('float32', 'float16') (a store's dtype)")
    return torch.float16 if name == "float16" else torch.float32


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise LexpInputError(
            f"precision={precision!r} is not one of {PRECISIONS}: '32' computes in float32, 'bf16-mixed' "
            "runs the matrix products in bfloat16."
        )


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _pad_batch(
    ids: Sequence[list[int]], type_ids: Sequence[list[int]] | None, tokenizer: Any, left: bool
) -> tuple[dict[str, torch.Tensor], np.ndarray, int]:
    """Pad a batch on the tokenizer's side; returns inputs, each row's offset and the width."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    offsets = width - lengths if left else np.zeros_like(lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    types = (
        None if type_ids is None else np.full((len(ids), width), tokenizer.pad_token_type_id, dtype=np.int64)
    )
    for row, (seq, off) in enumerate(zip(ids, offsets, strict=True)):
        input_ids[row, off : off + len(seq)] = seq
        mask[row, off : off + len(seq)] = 1
        if types is not None:
            types[row, off : off + len(seq)] = type_ids[row]
    inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        inputs["token_type_ids"] = torch.from_numpy(types)
    return inputs, offsets, width


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[slice]:
    """Consecutive batches over sequences sorted longest first: at most ``batch_size`` sequences and,
    with ``max_tokens``, at most that many padded tokens (count x longest), but never empty.

    A token budget keeps every forward a similar amount of work: many short sentences per batch,
    few long ones, so padding stays low without making the matrix products small.
    """
    out, start, n = [], 0, len(lengths)
    while start < n:
        stop = min(start + batch_size, n)
        if max_tokens is not None:
            stop = min(stop, start + max(1, max_tokens // max(1, lengths[start])))
        out.append(slice(start, stop))
        start = stop
    return out


def state_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of hidden states one token holds during a forward: every layer's state (embeddings
    included) in the weights' dtype, what ``output_hidden_states`` keeps until the batch is gathered."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    return (int(config.num_hidden_layers) + 1) * int(config.hidden_size) * int(itemsize)


def batch_plan(
    device: torch.device | str,
    batch_size: int,
    max_tokens: int | str | None,
    state_bytes: int | None = None,
) -> tuple[int, int | None]:
    """``(batch_size, max_tokens)`` for `_batches` from the ``extract`` settings.

    ``max_tokens="auto"``: on CUDA a budget of `GPU_MAX_TOKENS` padded tokens per forward and no
    separate sentence cap (short sentences fill the budget); on the CPU the sentence batches of
    ``batch_size`` lexp always used there. With ``state_bytes`` (`state_bytes_per_token`) the
    budget also keeps a forward's hidden states under `GPU_STATE_BYTES` / `CPU_STATE_BYTES`, so a
    wide model's batch of long sentences is cut instead of holding gigabytes (batching changes no
    row beyond float rounding, and not the store's fingerprint). An int budget on any device cuts
    the batches by the budget alone; ``None`` keeps sentence batches of ``batch_size``.
    """
    if max_tokens == "auto":
        if torch.device(device).type == "cuda":
            tokens = GPU_MAX_TOKENS
            if state_bytes:
                tokens = max(1, min(tokens, GPU_STATE_BYTES // int(state_bytes)))
            return tokens, tokens
        if state_bytes and int(batch_size) * _CPU_REFERENCE_TOKENS * int(state_bytes) > CPU_STATE_BYTES:
            return int(batch_size), max(1, CPU_STATE_BYTES // int(state_bytes))
        return int(batch_size), None
    if max_tokens is None:
        return int(batch_size), None
    return int(max_tokens), int(max_tokens)


def _check_batching(batch_size: Any, max_tokens: Any) -> None:
    bad_tokens = max_tokens not in (None, "auto") and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or bad_tokens:
        raise LexpInputError(
            f"batch_size must be an int >= 1 and max_tokens an int >= 1, 'auto' or None; got {batch_size!r} "
            f"and {max_tokens!r}."
        )


def _to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Inputs on the model's device; on CUDA staged through pinned memory, copied asynchronously."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in inputs.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}


class _DeviceToHost:
    """One device-to-host copy per batch.

    CUDA: the copy runs on a side stream, after an event recorded behind the batch's gather, into
    pinned host memory (``non_blocking``), and the returned event says when the host may read it.
    The caller queues the next batch's forward before waiting on that event, so the copy overlaps
    the next forward. Pinned blocks come from torch's caching host allocator: a block is reused as
    soon as the rows viewing it are dropped (after the writer stored them), so this is double
    buffering without a second copy out of a staging buffer, and the rows the caller keeps stay
    valid. CPU: the gathered buffer already is host memory and is returned as is.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.stream is None:
            return rows, None
        gathered = torch.cuda.Event()
        gathered.record(torch.cuda.current_stream(self.device))
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        self.stream.wait_event(gathered)
        with torch.cuda.stream(self.stream):
            host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        rows.record_stream(self.stream)  # the allocator keeps `rows` until the copy has read it
        return host, done

    @staticmethod
    def wait(host: torch.Tensor, done: Any) -> np.ndarray:
        if done is not None:
            done.synchronize()
        return host.numpy()


def _gather(
    hidden_states: Sequence[torch.Tensor],
    index: torch.Tensor,
    more: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The wanted token rows of every layer, on the states' device: float32 (rows, layers*hidden).

    ``index`` holds one flat token position (batch row * width + position) per output row. For
    the subword average, ``more[k-1] = (rows, tokens)`` adds each listed row's (k+1)-th subword
    and ``lengths`` (rows, 1) divides: each index_add_ names a row at most once, so the sums are
    taken in subword order on every device, deterministically (CUDA's index_add_ with repeated
    rows adds in no fixed order). One device buffer for all layers, filled layer by layer
    (stacking the hidden states first would copy every token of every layer).
    """
    dim = hidden_states[0].shape[-1]
    device = hidden_states[0].device
    n_rows = len(index)
    out = torch.empty((n_rows, len(hidden_states), dim), dtype=torch.float32, device=device)
    for layer, h in enumerate(hidden_states):
        flat = h.reshape(-1, dim)
        if lengths is None:
            out[:, layer] = flat.index_select(0, index)
            continue
        total = flat.index_select(0, index).float()
        for rows, tokens in more:
            total.index_add_(0, rows, flat.index_select(0, tokens).float())
        out[:, layer] = total.div_(lengths)
    return out.view(n_rows, -1)


def _mean_weights(
    chunk: Sequence[int], specials: Sequence[Sequence[int]], offsets: np.ndarray, width: int
) -> np.ndarray:
    """(batch, width) float32: 1/n at each example's n non-special tokens, 0 at specials and padding."""
    weights = np.zeros((len(chunk), width), dtype=np.float32)
    for row, (i, off) in enumerate(zip(chunk, offsets, strict=True)):
        keep = np.flatnonzero(np.asarray(specials[i]) == 0) + off
        weights[row, keep] = 1.0 / len(keep)
    return weights


def _mean(hidden_states: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Every layer's weighted token mean (`_mean_weights`), float32 (batch, layers*hidden)."""
    w = weights.unsqueeze(1)  # (batch, 1, width)
    rows = [torch.bmm(w, h.float()).squeeze(1) for h in hidden_states]
    return torch.stack(rows, dim=1).reshape(len(weights), -1)


def _check_layers(model: torch.nn.Module, layers: Sequence[int] | None) -> list[int] | None:
    """``layers`` as sorted model layer numbers within the model's depth (None: all)."""
    if layers is None:
        return None
    from lexp.layers import resolve_layers

    return resolve_layers(list(layers), int(model.config.num_hidden_layers) + 1) or None


def _up_to_top_layer(model: torch.nn.Module, layers: list[int] | None) -> tuple[torch.nn.Module, int | None]:
    """The model to run for ``layers`` and the layer it stops after (None: the whole model).

    ``[0,4,8]`` of a 32-layer model needs 8 layers, not 32: the model truncated after the top kept
    layer (`truncate_encoder`: shared weights, no copy) gives the same hidden states 0..8 (the same
    layers on the same input; a decoder's final norm, applied after its last layer only, is
    dropped). A model whose layer list lexp cannot find, or one that cannot run truncated (DeBERTa-v2
    at [0]), runs whole as before."""
    from lexp.redundancy.timing import encoder_depth, truncate_encoder

    if not layers:
        return model, None
    try:
        depth = encoder_depth(model)
        if max(layers) >= depth:
            return model, None
        return truncate_encoder(model, max(layers)), max(layers)
    except LexpModelError as exc:
        log.info("layers=%s: the whole model runs (%s)", layers, str(exc).split(":")[0])
        return model, None


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LexpModelError(
            f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; lexp needs word_ids() to align "
            "subwords with words. Fix: load the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def _name(i: int, sources: Sequence[str] | None) -> str:
    return f"#{i} ({sources[i]})" if sources is not None else f"#{i}"


def _check_sources(sources: Sequence[str] | None, n: int, what: str) -> None:
    if sources is not None and len(sources) != n:
        raise LexpInputError(
            f"got {len(sources)} sources for {n} {what}; pass one 'path:line' per item or none."
        )


def cls_position(tokenizer: Any) -> str:
    """Where the tokenizer puts its classification token: ``"first"`` (BERT) or ``"last"`` (XLNet).

    Decided from an actual encoding, not from the model name (`lexp.encoders.families`), so any
    tokenizer that follows either convention works.
    """
    from lexp.encoders.families import cls_position as position

    if tokenizer.cls_token_id is None:
        raise LexpModelError(
            f"{type(tokenizer).__name__} has no classification token (cls_token), so there is no [CLS] "
            "representation to extract. Fix: extract.sentence=last or mean (decoders: last, what their "
            "sequence-classification head reads), or auto."
        )
    where = position(tokenizer)
    if where is None:
        probe = list(tokenizer("a", "b")["input_ids"])
        raise LexpModelError(
            f"{type(tokenizer).__name__} puts its cls token neither first nor last ({probe}); lexp cannot "
            "tell which position is the sentence representation. Fix: extract.sentence=last or mean."
        )
    return where


# --------------------------------------------------------------------------------------------
# Windows for long sentences
# --------------------------------------------------------------------------------------------


def plan_windows(counts: Sequence[int], budget: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Cover a sentence with overlapping windows of whole words, each at most ``budget`` subwords.

    ``counts[i]`` is the number of subwords of word ``i``. Window ``k`` covers words
    ``[start_k, end_k)`` and is extended greedily to the budget; the next window starts as early as
    possible such that it overlaps the previous one by at most half the budget and still reaches
    one word further, so every window adds at least one word. Each word is then assigned to the
    window where it has the most context: the largest ``min(subwords to its left, subwords to its
    right)`` inside the window (as BERT's SQuAD "max context" rule), ties to the earlier window.

    Returns the windows and, per word, the index of its window. Raises ``ValueError`` if one word
    alone exceeds the budget.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    if n == 0:
        return [], np.zeros(0, dtype=np.int64)
    if budget <= 0 or counts.max() > budget:
        raise ValueError(f"a word of {int(counts.max())} subwords does not fit in a window of {budget}")
    prefix = np.concatenate([[0], np.cumsum(counts)])
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end = int(np.searchsorted(prefix, prefix[start] + budget, side="right")) - 1  # last fitting
        windows.append((start, end))
        if end >= n:
            break
        # earliest next start j > start with overlap <= budget/2 and room for word `end`
        lo = max(
            int(np.searchsorted(prefix, prefix[end] - budget // 2, side="left")),
            int(np.searchsorted(prefix, prefix[end + 1] - budget, side="left")),
            start + 1,
        )
        start = lo
    owner = np.full(n, -1, dtype=np.int64)
    best = np.full(n, -1, dtype=np.int64)
    for k, (s, e) in enumerate(windows):
        words = np.arange(s, e)
        context = np.minimum(prefix[words] - prefix[s], prefix[e] - prefix[words + 1])
        better = context > best[s:e]
        owner[s:e][better] = k
        best[s:e][better] = context[better]
    return windows, owner


# --------------------------------------------------------------------------------------------
# Word-level extraction
# --------------------------------------------------------------------------------------------


def _word_spans(word_ids: Sequence[int | None], n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last token position of each word; -1 for words with no token."""
    starts = np.full(n_words, -1, dtype=np.int64)
    ends = np.full(n_words, -1, dtype=np.int64)
    for pos, w in enumerate(word_ids):
        if w is not None:
            if starts[w] < 0:
                starts[w] = pos
            ends[w] = pos + 1
    return starts, ends


@dataclass
class _Piece:
    """One sequence to run: a whole sentence, or one window of a long sentence."""

    sentence: int
    ids: list[int]
    type_ids: list[int] | None
    starts: np.ndarray  # token span [start, end) of every word taken from this piece
    ends: np.ndarray
    rows: np.ndarray | None  # rows of the sentence these words fill (None: all, in order)


def _encode(tokenizer: Any, batch: list[list[str]], want_types: bool) -> Any:
    return tokenizer(
        batch,
        is_split_into_words=True,
        add_special_tokens=True,
        truncation=False,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=want_types,
        verbose=False,
    )


def extract_words(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    subword: str = "last",
    long_sentences: str = "error",
    progress: bool = True,
    sources: Sequence[str] | None = None,
    max_length: int | None = None,
    max_tokens: int | str | None = None,
    precision: str = "32",
    rows_dtype: str = "float32",
    layers: Sequence[int] | None = None,
) -> Extraction:
    """One activation row per word: yields ``(sentence index, float32 (n_words, n_layers*hidden))``.

    Runs on the device of the model's weights (move the model there first, e.g. with
    ``load_encoder(cfg, device=...)``); rows always arrive on the host as float32 numpy arrays.

    Args:
        sentences: pre-tokenised sentences (lists of words); each word keeps exactly one row.
        batch_size: sentences (or windows) per forward pass, after sorting by subword length.
        subword: which subword represents a word: ``"last"`` (the paper), ``"first"`` or ``"average"``.
        long_sentences: ``"error"`` raises a `LexpInputError` listing sentences longer than the
            model maximum; ``"window"`` encodes them in overlapping windows (`plan_windows`), each
            word taken from the window where it has the most context.
        sources: optional ``"path:line"`` per sentence, used to name offenders in messages.
        max_length: maximum subword tokens incl. special tokens; default: the model's maximum
            (`lexp.encoders.loading.model_max_tokens`; None = unbounded, e.g. XLNet).
        max_tokens: optional cap on padded tokens per forward (sequences x longest); with a large
            ``batch_size`` this batches by token budget, which wastes less compute on padding.
            ``"auto"``: `batch_plan` (a `GPU_MAX_TOKENS` budget alone on CUDA, sentence batches of
            ``batch_size`` on the CPU). Batching changes no row beyond float rounding (~1e-6).
        precision: ``"32"`` (float32, default; on CUDA without TF32) or ``"bf16-mixed"`` (bfloat16
            autocast: fast on GPUs and AVX-512-BF16 CPUs, ~1e-2 absolute error); rows are float32
            either way, unless ``rows_dtype``.
        rows_dtype: ``"float32"`` (default) or ``"float16"``: rows cast on the model's device before
            the copy to the host — half the transfer, and a float16 store then takes them as they
            are (the same IEEE round-to-nearest as casting on the host; values beyond ±65504 become
            inf, which the store refuses).
        layers: keep only these hidden states (model layer numbers, 0 = embeddings; None: all):
            the columns are then ``len(layers) * hidden`` (``model.layers``).

    Rows are yielded in processing order (longest first); place them by index. Words that tokenise
    to zero subwords (control or zero-width characters) are encoded as the unknown token and counted
    in ``.stats.n_unk_words`` with a warning, so the row count always equals the word count.
    """
    if subword not in SUBWORD_MODES:
        raise LexpInputError(
            f"subword={subword!r} is not one of {SUBWORD_MODES}; 'last' is the paper's choice."
        )
    if long_sentences not in LONG_SENTENCE_POLICIES:
        raise LexpInputError(f"long_sentences={long_sentences!r} is not one of {LONG_SENTENCE_POLICIES}.")
    _check_batching(batch_size, max_tokens)
    device = _device(model)
    if max_tokens == "auto":
        batch_size, max_tokens = batch_plan(device, batch_size, max_tokens, state_bytes_per_token(model))
    _check_precision(precision)
    out_dtype = _rows_dtype(rows_dtype)
    _check_fast(tokenizer)
    _check_sources(sources, len(sentences), "sentences")
    words = [list(s) for s in sentences]
    for i, ws in enumerate(words):
        bad = next((w for w in ws if not isinstance(w, str)), None)
        if bad is not None:
            raise LexpInputError(
                f"sentence {_name(i, sources)} holds a non-string word {bad!r}; words must be str."
            )
    want_types, forward_kwargs = _forward_options(model)
    limit = max_length if max_length is not None else model_max_tokens(model, tokenizer)
    stats = ExtractionStats(n_items=len(words))

    nonempty = [i for i, ws in enumerate(words) if ws]
    enc = _encode(tokenizer, [words[i] for i in nonempty], want_types) if nonempty else None
    ids: dict[int, list[int]] = {}
    types: dict[int, list[int] | None] = {}
    spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    missing: list[int] = []
    for j, i in enumerate(nonempty):
        ids[i] = enc["input_ids"][j]
        types[i] = enc["token_type_ids"][j] if want_types else None
        spans[i] = _word_spans(enc.word_ids(j), len(words[i]))
        if (spans[i][0] < 0).any():
            missing.append(i)
    if missing:
        _encode_unknown_words(tokenizer, words, missing, ids, types, spans, want_types, stats, sources)

    long = [i for i in nonempty if limit is not None and len(ids[i]) > limit]
    if long and long_sentences == "error":
        named = ", ".join(f"{_name(i, sources)}: {len(ids[i])} tokens" for i in long[:_SHOW])
        raise LexpInputError(
            f"{len(long)} of {len(words)} sentences are longer than the model maximum of {limit} subword "
            f"tokens (incl. special tokens); the longest has {max(len(ids[i]) for i in long)}. First: {named}"
            f"{' ...' if len(long) > _SHOW else ''}. lexp never truncates silently. Fix: encode them in "
            "overlapping windows with long_sentences='window' (extract.long_sentences=window), or split "
            "these sentences in the input file."
        )

    long_set = set(long)
    pieces = [_Piece(i, ids[i], types[i], *spans[i], rows=None) for i in nonempty if i not in long_set]
    n_pieces_of: dict[int, int] = {}
    if long:
        window_pieces = _window_pieces(tokenizer, words, long, ids, spans, limit, want_types, sources)
        for p in window_pieces:
            n_pieces_of[p.sentence] = n_pieces_of.get(p.sentence, 0) + 1
        pieces.extend(window_pieces)
        stats.n_windowed = len(long)
        stats.n_windows = len(window_pieces)
    pieces.sort(key=lambda p: -len(p.ids))  # stable: ties keep sentence order

    layers = _check_layers(model, layers)
    model, stats.layers_run = _up_to_top_layer(model, layers)
    n_layers = int(model.config.num_hidden_layers) + 1 if layers is None else len(layers)
    hidden = int(model.config.hidden_size)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    total_words = sum(len(ws) for ws in words)
    empties = [i for i, ws in enumerate(words) if not ws]

    def run(st: ExtractionStats) -> Iterator[list[tuple[int, np.ndarray]]]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_words, unit="word", unit_scale=True, desc="extract words", disable=not progress
        )
        pending: dict[int, tuple[np.ndarray, int]] = {}
        copier = _DeviceToHost(device)
        lag = 0 if copier.stream is None else 1  # CUDA: read batch i after queueing batch i+1
        in_flight: deque[tuple[list[_Piece], torch.Tensor, Any]] = deque()

        def collect(batch: list[_Piece], host: torch.Tensor, done: Any) -> list[tuple[int, np.ndarray]]:
            rows = copier.wait(host, done)
            out: list[tuple[int, np.ndarray]] = []
            at = 0
            for p in batch:
                k = len(p.starts)
                block = rows[at : at + k]
                at += k
                st.n_words += k
                if p.rows is None:
                    out.append((p.sentence, block))
                    continue
                buf, left_over = pending.get(p.sentence, (None, n_pieces_of[p.sentence]))
                if buf is None:
                    buf = np.empty((len(words[p.sentence]), rows.shape[1]), dtype=rows.dtype)
                buf[p.rows] = block
                if left_over == 1:
                    pending.pop(p.sentence, None)
                    out.append((p.sentence, buf))
                else:
                    pending[p.sentence] = (buf, left_over - 1)
            bar.update(at)
            return out

        clock = time.perf_counter()
        try:
            if empties:
                empty = np.zeros((0, n_layers * hidden), dtype=str(out_dtype).replace("torch.", ""))
                yield [(i, empty) for i in empties]
            for part in _batches([len(p.ids) for p in pieces], batch_size, max_tokens):
                batch = pieces[part]
                rows = _run_word_batch(
                    model, tokenizer, batch, subword, left, want_types, forward_kwargs, precision, st, layers
                )
                if rows.shape[1] != n_layers * hidden:
                    raise LexpModelError(
                        f"the model returned {rows.shape[1]} activations per token, expected "
                        f"{n_layers} layers * hidden_size = {n_layers * hidden}; lexp supports "
                        "encoders whose hidden_states are the embeddings plus one output per layer."
                    )
                in_flight.append((batch, *copier.start(rows.to(out_dtype))))
                if len(in_flight) > lag:
                    yield collect(*in_flight.popleft())
                    st.seconds = time.perf_counter() - clock
            while in_flight:
                yield collect(*in_flight.popleft())
        finally:
            bar.close()
            st.seconds = time.perf_counter() - clock

    return Extraction(run, stats)


def _encode_unknown_words(
    tokenizer: Any,
    words: list[list[str]],
    missing: list[int],
    ids: dict[int, list[int]],
    types: dict[int, list[int] | None],
    spans: dict[int, tuple[np.ndarray, np.ndarray]],
    want_types: bool,
    stats: ExtractionStats,
    sources: Sequence[str] | None,
) -> None:
    """Re-encode sentences whose words tokenise to nothing, with those words as the unk token."""
    unk = tokenizer.unk_token
    if unk is None:
        i = missing[0]
        raise LexpInputError(
            f"sentence {_name(i, sources)} has words that tokenise to zero subwords and the tokenizer has "
            "no unknown token to stand in for them. Fix: remove or replace these characters in the input."
        )
    examples = []
    for i in missing:
        gone = np.flatnonzero(spans[i][0] < 0)
        for w in gone:
            words[i][w] = unk
        stats.n_unk_words += len(gone)
        examples.extend(f"{_name(i, sources)} word {w + 1}" for w in gone[: max(0, _SHOW - len(examples))])
    enc = _encode(tokenizer, [words[i] for i in missing], want_types)
    for j, i in enumerate(missing):
        ids[i] = enc["input_ids"][j]
        types[i] = enc["token_type_ids"][j] if want_types else None
        spans[i] = _word_spans(enc.word_ids(j), len(words[i]))
        if (spans[i][0] < 0).any():  # pragma: no cover - the unk token always encodes to itself
            raise LexpModelError(f"the tokenizer drops its own unknown token {unk!r}; cannot align words.")
    log.warning(
        "%d word(s) tokenise to zero subwords (control or zero-width characters?) and were encoded as %r "
        "so that every word keeps its row; first: %s",
        stats.n_unk_words,
        unk,
        ", ".join(examples),
    )


def _window_pieces(
    tokenizer: Any,
    words: list[list[str]],
    long: list[int],
    ids: dict[int, list[int]],
    spans: dict[int, tuple[np.ndarray, np.ndarray]],
    limit: int,
    want_types: bool,
    sources: Sequence[str] | None,
) -> list[_Piece]:
    """Split long sentences into windows (`plan_windows`) and encode all windows in one call."""
    plans = []
    for i in long:
        counts = spans[i][1] - spans[i][0]
        budget = limit - (len(ids[i]) - int(counts.sum()))  # room left by the special tokens
        try:
            windows, owner = plan_windows(counts, budget)
        except ValueError:
            w = int(np.argmax(counts))
            raise LexpInputError(
                f"sentence {_name(i, sources)}: word {w + 1} ({words[i][w][:40]!r}) alone has {int(counts[w])} "
                f"subword tokens, more than fits in one window of {limit} tokens. Fix: split or remove "
                "that word in the input file."
            ) from None
        plans.extend((i, s, e, np.flatnonzero(owner[s:e] == k)) for k, (s, e) in enumerate(windows))
    enc = _encode(tokenizer, [words[i][s:e] for i, s, e, _ in plans], want_types)
    pieces = []
    for j, (i, s, e, take) in enumerate(plans):
        w_ids = enc["input_ids"][j]
        if len(w_ids) > limit:  # pragma: no cover - only if tokenisation depended on context
            raise LexpModelError(
                f"a window of sentence {_name(i, sources)} encodes to {len(w_ids)} > {limit} tokens although "
                "its words alone fit (context-dependent tokenizer). Fix: split this sentence in the input file."
            )
        starts, ends = _word_spans(enc.word_ids(j), e - s)
        pieces.append(
            _Piece(
                i,
                w_ids,
                enc["token_type_ids"][j] if want_types else None,
                starts[take],
                ends[take],
                rows=s + take,
            )
        )
    return pieces


def _run_word_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    batch: list[_Piece],
    subword: str,
    left: bool,
    want_types: bool,
    forward_kwargs: dict[str, Any],
    precision: str,
    stats: ExtractionStats,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Forward one batch and gather one row per taken word on the model's device: float32
    (n_words, n_layers*hidden). On CUDA the work is only queued; nothing waits for it here."""
    inputs, offsets, width = _pad_batch(
        [p.ids for p in batch], [p.type_ids for p in batch] if want_types else None, tokenizer, left
    )
    base = np.arange(len(batch), dtype=np.int64) * width + offsets  # flat index of each row's token 0
    starts = np.concatenate([p.starts + b for p, b in zip(batch, base, strict=True)])
    ends = np.concatenate([p.ends + b for p, b in zip(batch, base, strict=True)])
    stats.n_batches += 1
    stats.n_tokens += int(inputs["attention_mask"].sum())
    stats.n_padded_tokens += inputs["input_ids"].numel()
    device = _device(model)
    # gather indices (computed on the host) travel with the inputs: pinned and asynchronous on CUDA
    gather: dict[str, torch.Tensor] = {}
    n_more = 0
    if subword == "average":
        count = ends - starts
        gather["index"] = torch.from_numpy(starts)
        gather["lengths"] = torch.from_numpy(count.astype(np.float32)[:, None])
        for k in range(1, int(count.max())):  # row r's (k+1)-th subword, for rows that have one
            rows = np.flatnonzero(count > k)
            gather[f"rows{k}"], gather[f"tokens{k}"] = (
                torch.from_numpy(rows),
                torch.from_numpy(starts[rows] + k),
            )
            n_more = k
    else:
        gather["index"] = torch.from_numpy(starts if subword == "first" else ends - 1)
    inputs = _to_device(inputs, device)
    gather = _to_device(gather, device)
    more = [(gather[f"rows{k}"], gather[f"tokens{k}"]) for k in range(1, n_more + 1)]
    with _inference(model, precision):
        hidden_states = _hidden_states(model(**inputs, **forward_kwargs), layers)
        return _gather(hidden_states, gather["index"], more, gather.get("lengths"))


# --------------------------------------------------------------------------------------------
# Sentence-level ([CLS]) extraction
# --------------------------------------------------------------------------------------------


def extract_cls(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[str, str | None]],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = True,
    sources: Sequence[str] | None = None,
    max_tokens: int | str | None = None,
    precision: str = "32",
    rows_dtype: str = "float32",
    sentence: str = "cls",
    layers: Sequence[int] | None = None,
) -> Extraction:
    """The sentence representation of each example: yields ``(index, float32 (n_layers*hidden,))``.

    Runs on the device of the model's weights, like `extract_words`.

    Pairs are encoded as pairs (``text_a [SEP] text_b``). As in the paper's fine-tuning, examples
    longer than ``max_length`` tokens are truncated (longest sequence first); their number is in
    ``.stats.n_truncated`` and logged. The token is located from the tokenizer (`cls_position`):
    BERT's [CLS] is first, XLNet's <cls> is last (and XLNet pads on the left). ``sources``,
    ``max_tokens``, ``precision``, ``rows_dtype`` and ``layers`` are as in `extract_words`.

    ``sentence``: ``"cls"`` (the classification token, the paper's), ``"last"`` (the last non-padding
    token: what a decoder's sequence-classification head reads; either padding side), ``"mean"``
    (the mean over the example's tokens without special tokens, both texts of a pair) or ``"auto"``
    (`lexp.encoders.families.FamilyAdapter.sentence`: cls where the tokenizer has one, else last).
    """
    _check_batching(batch_size, max_tokens)
    device = _device(model)
    if max_tokens == "auto":
        batch_size, max_tokens = batch_plan(device, batch_size, max_tokens, state_bytes_per_token(model))
    _check_precision(precision)
    out_dtype = _rows_dtype(rows_dtype)
    _check_fast(tokenizer)
    _check_sources(sources, len(examples), "examples")
    layers = _check_layers(model, layers)
    model, layers_run = _up_to_top_layer(model, layers)
    model_limit = model_max_tokens(model, tokenizer)
    if model_limit is not None and max_length > model_limit:
        raise LexpInputError(
            f"max_length={max_length} exceeds the model maximum of {model_limit} tokens. "
            f"Fix: set max_length <= {model_limit} (the paper uses 128)."
        )
    for i, ex in enumerate(examples):
        if not (isinstance(ex, tuple | list) and len(ex) == 2 and isinstance(ex[0], str)):
            raise LexpInputError(
                f"example {_name(i, sources)} must be a (text_a, text_b or None) pair, got {ex!r}."
            )
        if ex[1] is not None and not isinstance(ex[1], str):
            raise LexpInputError(f"example {_name(i, sources)}: text_b must be a str or None, got {ex[1]!r}.")
    if sentence == "auto":
        from lexp.encoders.families import adapter_for

        sentence = adapter_for(model, tokenizer).sentence("auto")
    if sentence not in ("cls", "last", "mean"):
        raise LexpInputError(f"sentence={sentence!r} is not one of ('auto', 'cls', 'last', 'mean')")
    where = cls_position(tokenizer) if sentence == "cls" else "last"
    mean = sentence == "mean"
    want_types, forward_kwargs = _forward_options(model)
    stats = ExtractionStats(n_items=len(examples), layers_run=layers_run)

    ids: list[list[int]] = [[] for _ in examples]
    types: list[list[int]] = [[] for _ in examples]
    specials: list[list[int]] = [[] for _ in examples]  # sentence=mean: 1 at special tokens
    truncated: list[int] = []
    for paired in (False, True):
        group = [i for i, ex in enumerate(examples) if (ex[1] is not None) == paired]
        if not group:
            continue
        args = ([examples[i][0] for i in group],) + (([examples[i][1] for i in group],) if paired else ())
        enc = tokenizer(
            *args,
            truncation=False,
            return_token_type_ids=want_types,
            return_attention_mask=False,
            return_special_tokens_mask=mean,
            verbose=False,
        )
        over = [j for j, i in enumerate(group) if len(enc["input_ids"][j]) > max_length]
        if over:
            cut_args = ([args[0][j] for j in over],) + (([args[1][j] for j in over],) if paired else ())
            cut = tokenizer(
                *cut_args,
                truncation=True,
                max_length=max_length,
                return_token_type_ids=want_types,
                return_attention_mask=False,
                return_special_tokens_mask=mean,
            )
        for j, i in enumerate(group):
            ids[i] = enc["input_ids"][j]
            types[i] = enc["token_type_ids"][j] if want_types else []
            specials[i] = enc["special_tokens_mask"][j] if mean else []
        for k, j in enumerate(over):
            ids[group[j]] = cut["input_ids"][k]
            types[group[j]] = cut["token_type_ids"][k] if want_types else []
            specials[group[j]] = cut["special_tokens_mask"][k] if mean else []
            truncated.append(group[j])
    if mean:
        empty = [i for i in range(len(examples)) if all(specials[i])]
        if empty:
            raise LexpInputError(
                f"extract.sentence=mean: example {_name(empty[0], sources)} has no token besides special "
                "tokens, so it has no mean. Fix: remove the empty example or use extract.sentence=cls/last."
            )
    truncated.sort()
    stats.n_truncated = len(truncated)
    if truncated:
        log.warning(
            "%d of %d examples are longer than max_length=%d tokens and were truncated (as in the paper's "
            "fine-tuning); first: %s",
            len(truncated),
            len(examples),
            max_length,
            ", ".join(_name(i, sources) for i in truncated[:_SHOW]),
        )
    order = sorted(range(len(examples)), key=lambda i: -len(ids[i]))
    left = getattr(tokenizer, "padding_side", "right") == "left"

    def run(st: ExtractionStats) -> Iterator[list[tuple[int, np.ndarray]]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), unit="ex", unit_scale=True, desc="extract cls", disable=not progress)
        copier = _DeviceToHost(device)
        lag = 0 if copier.stream is None else 1  # CUDA: read batch i after queueing batch i+1
        in_flight: deque[tuple[list[int], torch.Tensor, Any]] = deque()

        def collect(chunk: list[int], host: torch.Tensor, done: Any) -> list[tuple[int, np.ndarray]]:
            rows = copier.wait(host, done)
            bar.update(len(chunk))
            return list(zip(chunk, rows, strict=True))

        clock = time.perf_counter()
        try:
            for part in _batches([len(ids[i]) for i in order], batch_size, max_tokens):
                chunk = order[part]
                inputs, offsets, width = _pad_batch(
                    [ids[i] for i in chunk],
                    [types[i] for i in chunk] if want_types else None,
                    tokenizer,
                    left,
                )
                lengths = np.array([len(ids[i]) for i in chunk], dtype=np.int64)
                pos = offsets + (0 if where == "first" else lengths - 1)
                index = torch.from_numpy(np.arange(len(chunk), dtype=np.int64) * width + pos)
                st.n_batches += 1
                st.n_tokens += int(lengths.sum())
                st.n_padded_tokens += inputs["input_ids"].numel()
                extra = {"_index": index}
                if mean:
                    extra["_weights"] = torch.from_numpy(_mean_weights(chunk, specials, offsets, width))
                moved = _to_device({**inputs, **extra}, device)
                index_d = moved.pop("_index")
                weights_d = moved.pop("_weights", None)
                with _inference(model, precision):
                    hidden_states = _hidden_states(model(**moved, **forward_kwargs), layers)
                    rows = (
                        _gather(hidden_states, index_d)
                        if weights_d is None
                        else _mean(hidden_states, weights_d)
                    )
                in_flight.append((chunk, *copier.start(rows.to(out_dtype))))
                if len(in_flight) > lag:
                    yield collect(*in_flight.popleft())
                    st.seconds = time.perf_counter() - clock
            while in_flight:
                yield collect(*in_flight.popleft())
        finally:
            bar.close()
            st.seconds = time.perf_counter() - clock

    return Extraction(run, stats)

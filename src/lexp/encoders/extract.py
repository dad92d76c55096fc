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
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lexp.encoders.loading import model_max_tokens
from lexp.errors import LexpInputError, LexpModelError

__all__ = [
    "SUBWORD_MODES",
    "PRECISIONS",
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
    seconds: float = 0.0  # wall time spent inside the iteration

    @property
    def words_per_second(self) -> float:
        return self.n_words / self.seconds if self.seconds > 0 else 0.0


class Extraction(Iterator[tuple[int, np.ndarray]]):
    """Iterator over ``(index, activations)`` that also exposes `ExtractionStats` as ``.stats``.

    Validation and tokenisation happen when the extractor is called (errors surface at once);
    forward passes happen lazily, batch by batch, while iterating.
    """

    def __init__(
        self, run: Callable[[ExtractionStats], Iterator[tuple[int, np.ndarray]]], stats: ExtractionStats
    ):
        self.stats = stats
        self._gen = run(stats)

    def __iter__(self) -> Extraction:
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


# --------------------------------------------------------------------------------------------
# Helpers shared by both extractors
# --------------------------------------------------------------------------------------------


def _forward_options(model: torch.nn.Module) -> tuple[bool, dict[str, Any]]:
    """Whether to pass token_type_ids, and extra forward kwargs (XLNet: no mems)."""
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
    if "use_mems" in params:
        extra["use_mems"] = False  # mems would only copy every hidden state; lexp never reuses them
    # Segment ids are passed whenever the model takes them: XLNet was pre-trained with them
    # (<cls> has its own segment) although transformers 5's XLNet tokenizer omits them by default.
    return "token_type_ids" in params, extra


@contextlib.contextmanager
def _inference(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for one forward; the caller's mode is restored, so
    a model being fine-tuned is never left in eval mode between two yielded rows.

    ``precision="bf16-mixed"`` runs the matrix products in bfloat16 (autocast): several times faster
    on CPUs with AVX-512-BF16, at the cost of ~1e-2 absolute error in the activations.
    """
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(_device(model).type, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        model.train(was_training)


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

    Decided from an actual encoding, not from the model name, so any tokenizer that follows either
    convention works.
    """
    cls_id = tokenizer.cls_token_id
    if cls_id is None:
        raise LexpModelError(
            f"{type(tokenizer).__name__} has no classification token (cls_token), so there is no [CLS] "
            "representation to extract. Fix: use a model with a [CLS]/<cls> token (BERT, XLNet, RoBERTa)."
        )
    probe = list(tokenizer("a", "b")["input_ids"])
    if probe[0] == cls_id:
        return "first"
    if probe[-1] == cls_id:
        return "last"
    raise LexpModelError(
        f"{type(tokenizer).__name__} puts its cls token neither first nor last ({probe}); lexp cannot "
        "tell which position is the sentence representation."
    )


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
    max_tokens: int | None = None,
    precision: str = "32",
) -> Extraction:
    """One activation row per word: yields ``(sentence index, float32 (n_words, n_layers*hidden))``.

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
        precision: ``"32"`` (float32, default) or ``"bf16-mixed"`` (bfloat16 matrix products,
            faster on AVX-512-BF16 CPUs, ~1e-2 absolute error); rows are float32 either way.

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
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise LexpInputError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}.")
    _check_precision(precision)
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

    n_layers = int(model.config.num_hidden_layers) + 1
    hidden = int(model.config.hidden_size)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    total_words = sum(len(ws) for ws in words)
    empties = [i for i, ws in enumerate(words) if not ws]

    def run(st: ExtractionStats) -> Iterator[tuple[int, np.ndarray]]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_words, unit="word", unit_scale=True, desc="extract words", disable=not progress
        )
        pending: dict[int, tuple[np.ndarray, int]] = {}
        clock = time.perf_counter()
        try:
            for i in empties:
                yield i, np.zeros((0, n_layers * hidden), dtype=np.float32)
            for part in _batches([len(p.ids) for p in pieces], batch_size, max_tokens):
                batch = pieces[part]
                rows = _run_word_batch(
                    model, tokenizer, batch, subword, left, want_types, forward_kwargs, precision, st
                )
                if rows.shape[1] != n_layers * hidden:
                    raise LexpModelError(
                        f"the model returned {rows.shape[1]} activations per token, expected "
                        f"(num_hidden_layers + 1) * hidden_size = {n_layers * hidden}; lexp supports "
                        "encoders whose hidden_states are the embeddings plus one output per layer."
                    )
                at = 0
                for p in batch:
                    k = len(p.starts)
                    block = rows[at : at + k]
                    at += k
                    st.n_words += k
                    if p.rows is None:
                        yield p.sentence, block
                        continue
                    buf, left_over = pending.get(p.sentence, (None, n_pieces_of[p.sentence]))
                    if buf is None:
                        buf = np.empty((len(words[p.sentence]), rows.shape[1]), dtype=np.float32)
                    buf[p.rows] = block
                    if left_over == 1:
                        pending.pop(p.sentence, None)
                        yield p.sentence, buf
                    else:
                        pending[p.sentence] = (buf, left_over - 1)
                bar.update(at)
                st.seconds = time.perf_counter() - clock
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
) -> np.ndarray:
    """Forward one batch and gather one row per taken word: float32 (n_words, n_layers*hidden)."""
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
    with _inference(model, precision):
        hidden_states = model(**{k: v.to(device) for k, v in inputs.items()}, **forward_kwargs).hidden_states
        n_rows, dim = len(starts), hidden_states[0].shape[-1]
        out = torch.empty((n_rows, len(hidden_states), dim), dtype=torch.float32)
        if subword == "average":
            lengths = ends - starts
            token = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
                lengths.sum()
            )
            token_t = torch.from_numpy(token).to(device)
            slot = torch.from_numpy(np.repeat(np.arange(n_rows), lengths)).to(device)
            scale = torch.from_numpy(lengths.astype(np.float32)).to(device)[:, None]
            for layer, h in enumerate(hidden_states):
                flat = h.reshape(-1, dim).index_select(0, token_t).float()
                out[:, layer] = (
                    torch.zeros((n_rows, dim), device=device).index_add_(0, slot, flat).div_(scale).cpu()
                )
        else:
            index = torch.from_numpy(starts if subword == "first" else ends - 1).to(device)
            for layer, h in enumerate(hidden_states):
                out[:, layer] = h.reshape(-1, dim).index_select(0, index).cpu()
    return out.numpy().reshape(n_rows, -1)


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
    max_tokens: int | None = None,
    precision: str = "32",
) -> Extraction:
    """The classification-token representation of each example: yields ``(index, float32 (n_layers*hidden,))``.

    Pairs are encoded as pairs (``text_a [SEP] text_b``). As in the paper's fine-tuning, examples
    longer than ``max_length`` tokens are truncated (longest sequence first); their number is in
    ``.stats.n_truncated`` and logged. The token is located from the tokenizer (`cls_position`):
    BERT's [CLS] is first, XLNet's <cls> is last (and XLNet pads on the left). ``sources``,
    ``max_tokens`` and ``precision`` are as in `extract_words`.
    """
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise LexpInputError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}.")
    _check_precision(precision)
    _check_fast(tokenizer)
    _check_sources(sources, len(examples), "examples")
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
    where = cls_position(tokenizer)
    want_types, forward_kwargs = _forward_options(model)
    stats = ExtractionStats(n_items=len(examples))

    ids: list[list[int]] = [[] for _ in examples]
    types: list[list[int]] = [[] for _ in examples]
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
            )
        for j, i in enumerate(group):
            ids[i] = enc["input_ids"][j]
            types[i] = enc["token_type_ids"][j] if want_types else []
        for k, j in enumerate(over):
            ids[group[j]] = cut["input_ids"][k]
            types[group[j]] = cut["token_type_ids"][k] if want_types else []
            truncated.append(group[j])
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

    def run(st: ExtractionStats) -> Iterator[tuple[int, np.ndarray]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), unit="ex", unit_scale=True, desc="extract cls", disable=not progress)
        clock = time.perf_counter()
        device = _device(model)
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
                index = torch.from_numpy(np.arange(len(chunk), dtype=np.int64) * width + pos).to(device)
                st.n_batches += 1
                st.n_tokens += int(lengths.sum())
                st.n_padded_tokens += inputs["input_ids"].numel()
                with _inference(model, precision):
                    hidden_states = model(
                        **{k: v.to(device) for k, v in inputs.items()}, **forward_kwargs
                    ).hidden_states
                    dim = hidden_states[0].shape[-1]
                    out = torch.empty((len(chunk), len(hidden_states), dim), dtype=torch.float32)
                    for layer, h in enumerate(hidden_states):
                        out[:, layer] = h.reshape(-1, dim).index_select(0, index).cpu()
                rows = out.numpy().reshape(len(chunk), -1)
                yield from zip(chunk, rows, strict=True)
                bar.update(len(chunk))
                st.seconds = time.perf_counter() - clock
        finally:
            bar.close()
            st.seconds = time.perf_counter() - clock

    return Extraction(run, stats)

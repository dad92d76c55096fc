"""Activation extraction: batched, length-sorted, padded extraction must equal a plain forward pass.

Reference vectors come from `transformers` directly: one sentence at a time, no padding, all
hidden states, the wanted subword picked by hand from ``word_ids()``. Tiny random BERT (WordPiece
from a vocab file) and XLNet (sentencepiece trained here, left padding) cover both conventions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lexp.encoders.extract import (
    ExtractionStats,
    _batches,
    cls_position,
    extract_cls,
    extract_words,
    plan_windows,
)
from lexp.errors import LexpInputError
from tiny_models import tiny_bert, tiny_xlnet

TOL = 1e-5
SENTENCES = [
    ["The", "quick", "brown", "foxes", "jumped", "."],
    ["A", "cat"],
    ["Unlikely", "treetops", "were", "running", "over", "the", "old", "red", "houses", "and", "dogs", "."],
    ["x", "xx", "xxx", "abc"],
    ["Neurons", "are", "redundant"],
    ["a"],
    ["The", "lazy", "dog", "is", "very", "old", ",", "not", "new", "."],
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def xlnet(tmp_path_factory):
    return tiny_xlnet(tmp_path_factory.mktemp("xlnet"))


def _forward_alone(model, tokenizer, words):
    """All hidden states of one sentence, no padding, plus its word_ids: the reference."""
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    kwargs = {"use_mems": False} if model.config.model_type == "xlnet" else {}
    if "token_type_ids" not in enc and model.config.model_type == "xlnet":
        enc = tokenizer(words, is_split_into_words=True, return_tensors="pt", return_token_type_ids=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, **kwargs)
    states = torch.stack([h[0] for h in out.hidden_states])  # (layers, tokens, hidden)
    return states, enc.word_ids(0), enc["input_ids"][0]


def _reference_words(model, tokenizer, words, subword):
    states, word_ids, _ = _forward_alone(model, tokenizer, words)
    rows = []
    for w in range(len(words)):
        pos = [p for p, wid in enumerate(word_ids) if wid == w]
        assert pos, f"test word {words[w]!r} must tokenise to at least one subword"
        if subword == "first":
            vec = states[:, pos[0]]
        elif subword == "last":
            vec = states[:, pos[-1]]
        else:
            vec = states[:, pos].mean(dim=1)
        rows.append(vec.reshape(-1))  # layer-major: layer * hidden + unit
    return torch.stack(rows).numpy()


def _collect(extraction, n):
    out = {}
    for i, rows in extraction:
        assert i not in out, "each index is yielded once"
        out[i] = rows
    assert sorted(out) == list(range(n))
    return out


@pytest.mark.parametrize("family", ["bert", "xlnet"])
@pytest.mark.parametrize("subword", ["last", "first", "average"])
def test_words_equal_single_sentence_forward(family, subword, bert, xlnet):
    model, tokenizer = bert if family == "bert" else xlnet
    ex = extract_words(model, tokenizer, SENTENCES, batch_size=3, subword=subword, progress=False)
    got = _collect(ex, len(SENTENCES))
    n_layers, hidden = model.config.num_hidden_layers + 1, model.config.hidden_size
    for i, words in enumerate(SENTENCES):
        assert got[i].dtype == np.float32 and got[i].shape == (len(words), n_layers * hidden)
        np.testing.assert_allclose(
            got[i], _reference_words(model, tokenizer, words, subword), atol=TOL, rtol=0
        )
    assert ex.stats.n_words == sum(map(len, SENTENCES))
    assert ex.stats.n_padded_tokens > ex.stats.n_tokens, "batches must actually contain padding"


def test_token_budget_batches():
    lengths = [10, 8, 8, 5, 3, 3, 3, 2]
    assert _batches(lengths, 4, None) == [slice(0, 4), slice(4, 8)]
    assert _batches(lengths, 4, 20) == [slice(0, 2), slice(2, 4), slice(4, 8)]
    assert _batches([50, 1], 8, 20) == [slice(0, 1), slice(1, 2)]  # one sequence over budget: alone


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_token_budget_gives_the_same_rows(family, bert, xlnet):
    model, tokenizer = bert if family == "bert" else xlnet
    ex = extract_words(model, tokenizer, SENTENCES, batch_size=64, max_tokens=40, progress=False)
    got = _collect(ex, len(SENTENCES))
    assert 1 < ex.stats.n_batches < len(SENTENCES)
    for i, words in enumerate(SENTENCES):
        np.testing.assert_allclose(
            got[i], _reference_words(model, tokenizer, words, "last"), atol=TOL, rtol=0
        )


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_bf16_mixed_precision_is_close_but_not_equal(family, bert, xlnet):
    model, tokenizer = bert if family == "bert" else xlnet
    exact = _collect(extract_words(model, tokenizer, SENTENCES, progress=False), len(SENTENCES))
    fast = _collect(
        extract_words(model, tokenizer, SENTENCES, precision="bf16-mixed", progress=False), len(SENTENCES)
    )
    diff = max(float(np.abs(exact[i] - fast[i]).max()) for i in exact)
    assert all(fast[i].dtype == np.float32 for i in fast)
    assert 1e-4 < diff < 0.15  # bfloat16 has 8 mantissa bits: visible, small differences
    cls_exact = dict(extract_cls(model, tokenizer, EXAMPLES, progress=False))
    cls_fast = dict(extract_cls(model, tokenizer, EXAMPLES, precision="bf16-mixed", progress=False))
    assert 1e-4 < max(float(np.abs(cls_exact[i] - cls_fast[i]).max()) for i in cls_exact) < 0.15
    with pytest.raises(LexpInputError, match="precision"):
        extract_words(model, tokenizer, SENTENCES, precision="16")


def test_subword_modes_differ_on_split_words(bert):
    model, tokenizer = bert
    words = [["jumped", "treetops"]]  # jump ##ed, tree ##top ##s
    rows = {
        m: dict(extract_words(model, tokenizer, words, subword=m, progress=False))[0]
        for m in ("first", "last")
    }
    assert np.abs(rows["first"] - rows["last"]).max() > 1e-3


def test_layer_zero_is_the_embedding_layer(bert, xlnet):
    model, tokenizer = bert
    words = ["The", "old", "cat"]
    row = dict(extract_words(model, tokenizer, [words], progress=False))[0]
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        emb = model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])[0]
    np.testing.assert_allclose(row[:, :32], emb[1:4].numpy(), atol=1e-6)  # one subword each

    model, tokenizer = xlnet
    words = ["The", "dog"]
    row = dict(extract_words(model, tokenizer, [words], progress=False))[0]
    _, word_ids, ids = _forward_alone(model, tokenizer, words)
    last = [max(p for p, w in enumerate(word_ids) if w == k) for k in range(2)]
    with torch.no_grad():
        emb = model.word_embedding(ids[last])  # XLNet has no absolute positions in layer 0
    np.testing.assert_allclose(row[:, :32], emb.numpy(), atol=1e-6)


def test_xlnet_left_padding_and_layout(xlnet):
    model, tokenizer = xlnet
    assert tokenizer.padding_side == "left"
    short, long_ = ["The", "dog"], SENTENCES[2]
    got = _collect(extract_words(model, tokenizer, [long_, short], batch_size=2, progress=False), 2)
    np.testing.assert_allclose(got[1], _reference_words(model, tokenizer, short, "last"), atol=TOL, rtol=0)
    assert got[1].shape == (2, 3 * 32)


def test_zero_subword_words_keep_their_row(bert, caplog):
    model, tokenizer = bert
    words = ["The", "\u200b", "cat", "\x00"]  # zero-width space and NUL vanish in BERT's normaliser
    assert {w for w in tokenizer(words, is_split_into_words=True).word_ids() if w is not None} == {0, 2}
    with caplog.at_level(logging.WARNING, logger="lexp.encoders.extract"):
        ex = extract_words(model, tokenizer, [words], progress=False, sources=["f.conllu:7"])
        rows = dict(ex)[0]
    assert rows.shape[0] == 4 and ex.stats.n_unk_words == 2
    assert "2 word(s)" in caplog.text and "f.conllu:7" in caplog.text
    expected = _reference_words(model, tokenizer, ["The", "[UNK]", "cat", "[UNK]"], "last")
    np.testing.assert_allclose(rows, expected, atol=TOL, rtol=0)


def test_training_mode_model_is_run_in_eval_mode_and_restored(bert):
    model, tokenizer = bert
    model.train()  # dropout on: a forward in this mode would be random
    try:
        for i, rows in extract_words(model, tokenizer, SENTENCES[:3], batch_size=2, progress=False):
            assert model.training, "the caller's mode is restored between batches"
            np.testing.assert_allclose(
                rows, _reference_words(model.eval(), tokenizer, SENTENCES[i], "last"), atol=TOL
            )
            model.train()
        for _index, _row in extract_cls(model, tokenizer, EXAMPLES[:2], progress=False):
            assert model.training
    finally:
        model.eval()


def test_empty_sentence_gets_empty_block(bert):
    model, tokenizer = bert
    got = _collect(extract_words(model, tokenizer, [["a"], [], ["cat"]], progress=False), 3)
    assert got[1].shape == (0, 3 * 32) and got[0].shape == (1, 96) and got[2].shape == (1, 96)


def test_bad_arguments_raise(bert):
    model, tokenizer = bert
    with pytest.raises(LexpInputError, match="subword"):
        extract_words(model, tokenizer, [["a"]], subword="middle")
    with pytest.raises(LexpInputError, match="long_sentences"):
        extract_words(model, tokenizer, [["a"]], long_sentences="truncate")
    with pytest.raises(LexpInputError, match="non-string word"):
        extract_words(model, tokenizer, [["a", 3]])
    with pytest.raises(LexpInputError, match="sources"):
        extract_words(model, tokenizer, [["a"]], sources=["x:1", "x:2"])


# ---- long sentences ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_bert(tmp_path_factory):
    """BERT whose position table (16) is shorter than some test sentences."""
    return tiny_bert(tmp_path_factory.mktemp("short"), max_positions=16)


LONG = [
    "The quick brown fox jumped over the lazy dog and the old cat was running".split(),  # 16 words
    ["A", "cat"],
    "Unlikely treetops were running over the old red houses and dogs , not trees .".split(),  # 21 tokens
]


def test_long_sentences_error_counts_and_names_offenders(short_bert):
    model, tokenizer = short_bert
    sources = ["dev.conllu:1", "dev.conllu:20", "dev.conllu:30"]
    with pytest.raises(LexpInputError) as err:
        extract_words(model, tokenizer, LONG, sources=sources, progress=False)
    msg = str(err.value)
    assert "2 of 3 sentences are longer than the model maximum of 16" in msg
    assert "dev.conllu:1" in msg and "dev.conllu:30" in msg and "dev.conllu:20" not in msg
    assert "long_sentences='window'" in msg


def test_window_mode_is_identical_when_sentences_fit(bert):
    model, tokenizer = bert
    plain = _collect(extract_words(model, tokenizer, SENTENCES, progress=False), len(SENTENCES))
    ex = extract_words(model, tokenizer, SENTENCES, long_sentences="window", progress=False)
    windowed = _collect(ex, len(SENTENCES))
    assert ex.stats.n_windowed == 0
    for i in plain:
        np.testing.assert_array_equal(plain[i], windowed[i])


@pytest.mark.parametrize("subword", ["last", "average"])
@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_window_rows_equal_their_window_run_alone(family, subword, short_bert, xlnet):
    """Guarantee of window mode: a word's row is its row in the best window encoded as a sentence.

    BERT's limit comes from its 16-entry position table; XLNet has none, so max_length sets it.
    """
    model, tokenizer = short_bert if family == "bert" else xlnet
    limit = 16 if family == "bert" else 40
    ex = extract_words(
        model,
        tokenizer,
        LONG,
        batch_size=4,
        long_sentences="window",
        subword=subword,
        progress=False,
        max_length=None if family == "bert" else limit,
    )
    got = _collect(ex, len(LONG))
    assert ex.stats.n_windowed == 2 and ex.stats.n_windows >= 4
    np.testing.assert_allclose(got[1], _reference_words(model, tokenizer, LONG[1], subword), atol=TOL, rtol=0)
    for i in (0, 2):
        words = LONG[i]
        counts = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
        windows, owner = plan_windows(counts, limit - 2)
        assert len(windows) >= 2
        assert got[i].shape[0] == len(words)
        for k, (s, e) in enumerate(windows):
            ref = _reference_words(model, tokenizer, words[s:e], subword)
            take = np.flatnonzero(owner[s:e] == k)
            np.testing.assert_allclose(got[i][s + take], ref[take], atol=TOL, rtol=0)


def test_window_whose_single_word_is_too_long_raises(short_bert):
    model, tokenizer = short_bert
    monster = ["x" * 20]  # x ##x ... 20 subwords > 14
    with pytest.raises(LexpInputError, match="word 1 .* alone has 20 subword tokens"):
        extract_words(model, tokenizer, [monster], long_sentences="window", progress=False)


def test_plan_windows_known_answer():
    counts = [1] * 10
    windows, owner = plan_windows(counts, 4)
    # greedy 4-word windows, next start overlaps by budget//2 = 2 words
    assert windows == [(0, 4), (2, 6), (4, 8), (6, 10)]
    # word 2 has context (2 left, 1 right) in window 0 and (0, 3) in window 1 -> window 0
    assert owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_plan_windows_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 6, size=rng.integers(1, 40))
        budget = int(rng.integers(counts.max(), 25))
        windows, owner = plan_windows(counts, budget)
        prefix = np.concatenate([[0], np.cumsum(counts)])
        assert windows[0][0] == 0 and windows[-1][1] == len(counts)
        for (s, e), (s2, e2) in zip(windows, windows[1:], strict=False):
            assert s < s2 <= e < e2  # progress, overlap or contiguity, no gap
        for s, e in windows:
            assert prefix[e] - prefix[s] <= budget
            if e < len(counts):
                assert prefix[e + 1] - prefix[s] > budget  # greedy: the next word did not fit
        for w, k in enumerate(owner):
            s, e = windows[k]
            assert s <= w < e
            ctx = min(prefix[w] - prefix[s], prefix[e] - prefix[w + 1])
            others = [min(prefix[w] - prefix[a], prefix[b] - prefix[w + 1]) for a, b in windows if a <= w < b]
            assert ctx == max(others)
    with pytest.raises(ValueError):
        plan_windows([3, 9, 2], 8)


# ---- [CLS] --------------------------------------------------------------------------------

EXAMPLES = [
    ("The quick brown fox jumped .", None),
    ("A cat", "The old dog"),
    ("Unlikely treetops were running over the old red houses .", "And dogs ."),
    ("x", None),
]


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_cls_equals_direct_forward(family, bert, xlnet):
    model, tokenizer = bert if family == "bert" else xlnet
    assert cls_position(tokenizer) == ("first" if family == "bert" else "last")
    ex = extract_cls(model, tokenizer, EXAMPLES, batch_size=3, progress=False)
    got = _collect(ex, len(EXAMPLES))
    assert ex.stats.n_truncated == 0
    kwargs = {"use_mems": False} if family == "xlnet" else {}
    for i, (a, b) in enumerate(EXAMPLES):
        enc = tokenizer(a, b, return_tensors="pt", return_token_type_ids=True)
        with torch.no_grad():
            states = model(**enc, output_hidden_states=True, **kwargs).hidden_states
        pos = 0 if family == "bert" else -1
        assert enc["input_ids"][0, pos] == tokenizer.cls_token_id
        ref = torch.cat([h[0, pos] for h in states]).numpy()
        assert got[i].shape == (3 * 32,)
        np.testing.assert_allclose(got[i], ref, atol=TOL, rtol=0)


def test_cls_truncation_is_counted_and_matches_truncated_forward(bert, caplog):
    model, tokenizer = bert
    with caplog.at_level(logging.WARNING, logger="lexp.encoders.extract"):
        ex = extract_cls(model, tokenizer, EXAMPLES, max_length=8, progress=False, sources=list("abcd"))
        got = _collect(ex, len(EXAMPLES))
    assert ex.stats.n_truncated == 2  # example 0 has 9 tokens, 2 has 14; pair 1 has exactly 8
    assert "2 of 4 examples" in caplog.text
    enc = tokenizer(*EXAMPLES[2], truncation=True, max_length=8, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 8
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(got[2], torch.cat([h[0, 0] for h in states]).numpy(), atol=TOL, rtol=0)


def test_cls_rejects_max_length_beyond_model(short_bert):
    model, tokenizer = short_bert
    with pytest.raises(LexpInputError, match="exceeds the model maximum of 16"):
        extract_cls(model, tokenizer, EXAMPLES, max_length=128)


def test_stats_words_per_second():
    st = ExtractionStats(n_words=100, seconds=0.5)
    assert st.words_per_second == 200.0 and ExtractionStats().words_per_second == 0.0


# ---- the real MiniLM on real EWT sentences ---------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from lexp.encoders.loading import load_encoder

    enc = load_encoder({"name": "minilm", "name_or_path": "minilm"})
    return enc.model, enc.tokenizer


def _ewt_sentences(data_root: Path, n: int) -> list[list[str]]:
    sentences, words = [], []
    path = data_root / "ud_english_ewt" / "en_ewt-ud-dev.conllu"
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if words:
                sentences.append(words)
                words = []
                if len(sentences) == n:
                    break
        elif not line.startswith("#"):
            cols = line.split("\t")
            if cols[0].isdigit():
                words.append(cols[1])
    return sentences


def test_minilm_on_real_ewt_sentences(minilm, data_root):
    model, tokenizer = minilm
    sentences = _ewt_sentences(data_root, 5)
    got = _collect(extract_words(model, tokenizer, sentences, batch_size=5, progress=False), 5)
    for i, words in enumerate(sentences):
        assert got[i].shape == (len(words), 7 * 384)
        np.testing.assert_allclose(
            got[i], _reference_words(model, tokenizer, words, "last"), atol=TOL, rtol=0
        )


def test_minilm_windows_stay_close_to_full_sentence(minilm, data_root):
    """Windows change absolute positions and context, so rows are not identical to the full-sentence
    rows; with overlapping windows and max-context assignment they stay close on average and the worst
    word is clearly better off than with non-overlapping chunks of the same size."""
    model, tokenizer = minilm
    sentences = sorted(_ewt_sentences(data_root, 400), key=len)[-5:]  # 39-52 words, 57-90 subwords
    full = _collect(extract_words(model, tokenizer, sentences, progress=False), 5)
    ex = extract_words(model, tokenizer, sentences, long_sentences="window", max_length=48, progress=False)
    win = _collect(ex, 5)
    assert ex.stats.n_windowed == 5

    chunks = []  # baseline: greedy non-overlapping chunks of at most 46 subwords
    for i, words in enumerate(sentences):
        start, used = 0, 0
        for j, word in enumerate(words):
            n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
            if used + n > 46:
                chunks.append((i, start, j))
                start, used = j, 0
            used += n
        chunks.append((i, start, len(words)))
    parts = _collect(
        extract_words(model, tokenizer, [sentences[i][a:b] for i, a, b in chunks], progress=False),
        len(chunks),
    )
    naive = {i: np.concatenate([parts[k] for k, c in enumerate(chunks) if c[0] == i]) for i in range(5)}

    def cosines(rows, layer):
        cols = slice(layer * 384, (layer + 1) * 384)
        a = np.concatenate([full[i][:, cols] for i in range(5)])
        b = np.concatenate([rows[i][:, cols] for i in range(5)])
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    for layer, mean_floor in ((3, 0.93), (6, 0.88)):  # measured 0.949 and 0.910
        cos_win, cos_naive = cosines(win, layer), cosines(naive, layer)
        assert cos_win.mean() > mean_floor
        assert cos_win.min() > cos_naive.min() + 0.1  # measured 0.79 vs 0.63, 0.44 vs 0.31

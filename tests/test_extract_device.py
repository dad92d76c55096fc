"""Extraction on the run's device equals the plain CPU float32 path; the background store writer.

Every reference here is the simplest possible computation, written out in the test: one sentence
(or window, or example) at a time, on the CPU, in float32, no padding, all hidden states, the
wanted subword picked by hand from the fast tokenizer's ``word_ids()``. The extraction under test
runs on the ``device`` fixture (cpu always, cuda where there is one) with its batching, padding
(XLNet pads on the left), device-side gather and asynchronous copies. Tolerance 1e-4: the issue's
bar for "the same rows" across devices.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lexp.encoders.extract import GPU_MAX_TOKENS, batch_plan, extract_cls, extract_words, plan_windows
from lexp.encoders.writer import BackgroundWriter, report_counts, write_extraction
from lexp.errors import LexpInputError
from lexp.store import StoreWriter, open_store
from tiny_models import save_model, tiny_bert, tiny_xlnet

TOL = 1e-4
SENTENCES = [
    ["The", "quick", "brown", "foxes", "jumped", "."],
    ["A", "cat"],
    ["Unlikely", "treetops", "were", "running", "over", "the", "old", "red", "houses", "and", "dogs", "."],
    ["x", "xx", "xxx", "abc"],
    ["Neurons", "are", "redundant"],
    ["a"],
    ["The", "lazy", "dog", "is", "very", "old", ",", "not", "new", "."],
    ["treetops", "unlikely"],
]
LONG = [
    "The quick brown fox jumped over the lazy dog and the old cat was running".split(),
    ["A", "cat"],
    "Unlikely treetops were running over the old red houses and dogs , not trees .".split(),
]
EXAMPLES = [
    ("The quick brown fox jumped .", None),
    ("A cat", "The old dog"),
    ("Unlikely treetops were running over the old red houses .", "And dogs ."),
    ("x", None),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """CPU float32 reference models: BERT (right padding), XLNet (left padding), a short BERT."""
    return {
        "bert": tiny_bert(tmp_path_factory.mktemp("bert")),
        "xlnet": tiny_xlnet(tmp_path_factory.mktemp("xlnet")),
        "short": tiny_bert(tmp_path_factory.mktemp("short"), max_positions=16),
    }


def _on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return copy.deepcopy(model).to(device)


def _states_alone(model, tokenizer, text, text_b=None, split=True):
    """(layers, tokens, hidden) float32 of one input on the CPU, no padding; and the encoding."""
    enc = tokenizer(text, text_b, is_split_into_words=split, return_tensors="pt", return_token_type_ids=True)
    extra = {"use_mems": False} if model.config.model_type == "xlnet" else {}
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, **extra)
    return torch.stack([h[0] for h in out.hidden_states]).float(), enc


def _reference(model, tokenizer, words, subword):
    """One row per word, layer-major, from a single-sentence forward on the CPU."""
    states, enc = _states_alone(model, tokenizer, words)
    word_ids = enc.word_ids(0)
    rows = []
    for w in range(len(words)):
        pos = [p for p, wid in enumerate(word_ids) if wid == w]
        pick = {"first": pos[:1], "last": pos[-1:], "average": pos}[subword]
        rows.append(states[:, pick].mean(dim=1).reshape(-1))
    return torch.stack(rows).numpy()


def _collect(extraction, n):
    out = {}
    for i, rows in extraction:
        assert i not in out
        out[i] = np.array(rows)
    assert sorted(out) == list(range(n))
    return out


@pytest.mark.parametrize("subword", ["last", "first", "average"])
@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_words_on_device_equal_the_cpu_reference(device, family, subword, models):
    model, tokenizer = models[family]
    ex = extract_words(
        _on(model, device), tokenizer, SENTENCES, batch_size=3, subword=subword, progress=False
    )
    got = _collect(ex, len(SENTENCES))
    assert ex.stats.n_batches == 3 and ex.stats.n_padded_tokens > ex.stats.n_tokens  # padding really happens
    for i, words in enumerate(SENTENCES):
        assert got[i].dtype == np.float32
        np.testing.assert_allclose(got[i], _reference(model, tokenizer, words, subword), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_token_budget_gives_the_rows_of_sentence_batches(device, family, models):
    model, tokenizer = models[family]
    on_device = _on(model, device)
    by_count = _collect(extract_words(on_device, tokenizer, SENTENCES, batch_size=2, progress=False), 8)
    ex = extract_words(on_device, tokenizer, SENTENCES, batch_size=1000, max_tokens=45, progress=False)
    by_budget = _collect(ex, len(SENTENCES))
    assert 1 < ex.stats.n_batches < len(SENTENCES)  # the budget, not the sentence count (1000), cut them
    for i, words in enumerate(SENTENCES):
        np.testing.assert_allclose(by_budget[i], by_count[i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            by_budget[i], _reference(model, tokenizer, words, "last"), atol=TOL, rtol=0
        )


@pytest.mark.parametrize("subword", ["last", "average"])
def test_windows_on_device_equal_each_window_run_alone_on_the_cpu(device, subword, models):
    model, tokenizer = models["short"]  # 16 positions: LONG[0] and LONG[2] need windows
    ex = extract_words(
        _on(model, device),
        tokenizer,
        LONG,
        batch_size=4,
        long_sentences="window",
        subword=subword,
        progress=False,
    )
    got = _collect(ex, len(LONG))
    assert ex.stats.n_windowed == 2 and ex.stats.n_windows >= 4
    np.testing.assert_allclose(got[1], _reference(model, tokenizer, LONG[1], subword), atol=TOL, rtol=0)
    for i in (0, 2):
        counts = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in LONG[i]]
        windows, owner = plan_windows(counts, 16 - 2)  # [CLS] and [SEP] take two positions
        for k, (s, e) in enumerate(windows):
            take = np.flatnonzero(owner[s:e] == k)
            ref = _reference(model, tokenizer, LONG[i][s:e], subword)
            np.testing.assert_allclose(got[i][s + take], ref[take], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_cls_on_device_equals_the_cpu_reference(device, family, models):
    model, tokenizer = models[family]
    ex = extract_cls(_on(model, device), tokenizer, EXAMPLES, batch_size=3, progress=False)
    got = _collect(ex, len(EXAMPLES))
    for i, (a, b) in enumerate(EXAMPLES):
        states, enc = _states_alone(model, tokenizer, a, b, split=False)
        pos = 0 if family == "bert" else -1  # BERT's [CLS] is first, XLNet's <cls> last
        assert enc["input_ids"][0, pos] == tokenizer.cls_token_id
        np.testing.assert_allclose(got[i], states[:, pos].reshape(-1).numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("what", ["words", "cls"])
def test_batch_i_is_read_after_batch_i_plus_1_is_queued(what, models, monkeypatch):
    """The CUDA double-buffering order, checked on any machine: a stand-in copier that behaves
    like the CUDA one (a stream, a copy per batch) records when each batch is started and read."""
    import lexp.encoders.extract as extract

    events = []

    class Recording(extract._DeviceToHost):
        def __init__(self, device):
            self.device, self.stream = device, "side stream"

        def start(self, rows):
            events.append(("start", len(events)))
            return rows.clone(), len(events) - 1

        @staticmethod
        def wait(host, done):
            events.append(("wait", done))
            return host.numpy()

    monkeypatch.setattr(extract, "_DeviceToHost", Recording)
    model, tokenizer = models["xlnet"]
    if what == "words":
        got = _collect(extract_words(model, tokenizer, SENTENCES, batch_size=3, progress=False), 8)
        for i, words in enumerate(SENTENCES):
            np.testing.assert_allclose(got[i], _reference(model, tokenizer, words, "last"), atol=TOL, rtol=0)
    else:
        got = _collect(extract_cls(model, tokenizer, EXAMPLES, batch_size=1, progress=False), 4)
    kinds = [k for k, _ in events]
    n = kinds.count("start")
    assert n == (3 if what == "words" else 4)
    # start 0, start 1, wait 0, start 2, wait 1, ..., wait n-1: each read follows the next launch
    assert kinds == ["start", "start"] + ["wait", "start"] * (n - 2) + ["wait", "wait"]
    assert [d for k, d in events if k == "wait"] == [i for k, i in events if k == "start"]


def test_auto_token_budget_plan():
    assert batch_plan("cpu", 32, "auto") == (32, None)  # the CPU keeps today's sentence batches
    assert batch_plan("cuda", 32, "auto") == (GPU_MAX_TOKENS, GPU_MAX_TOKENS) == (32768, 32768)
    assert batch_plan("cpu", 32, None) == (32, None)
    assert batch_plan(torch.device("cpu"), 32, 4096) == (4096, 4096)  # a set budget alone cuts batches
    # with the bytes of hidden states per token, auto also bounds a forward's states by width
    minilm, bert_base, wide = 7 * 384 * 4, 13 * 768 * 4, 17 * 2048 * 4  # the last: 16 × 2048 decoder
    assert batch_plan("cpu", 32, "auto", minilm) == batch_plan("cpu", 32, "auto", bert_base) == (32, None)
    assert batch_plan("cpu", 32, "auto", wide) == (32, (1 << 30) // wide) == (32, 7710)
    assert batch_plan("cuda", 32, "auto", bert_base) == (32768, 32768)  # 1.3 GB of states: unchanged
    llama70b_bf16 = 81 * 8192 * 2
    assert batch_plan("cuda", 32, "auto", llama70b_bf16) == ((8 << 30) // llama70b_bf16,) * 2 == (6472, 6472)
    assert batch_plan("cpu", 32, 4096, wide) == (4096, 4096)  # a budget the user set is kept


def test_a_wide_model_cuts_long_batches_with_the_same_rows(models, monkeypatch):
    """auto on the CPU: sentence batches, cut where batch_size sentences' hidden states would pass
    CPU_STATE_BYTES (lowered here so the tiny model meets it); the rows are those of the uncut run."""
    import lexp.encoders.extract as extract

    model, tokenizer = models["bert"]
    per_token = extract.state_bytes_per_token(model)
    assert per_token == (model.config.num_hidden_layers + 1) * model.config.hidden_size * 4
    plain = extract_words(model, tokenizer, SENTENCES, batch_size=8, progress=False)
    want = dict(plain)
    monkeypatch.setattr(extract, "CPU_STATE_BYTES", 20 * per_token)  # 20 padded tokens per forward
    cut = extract_words(model, tokenizer, SENTENCES, batch_size=8, max_tokens="auto", progress=False)
    got = dict(cut)
    assert plain.stats.n_batches == 1 and cut.stats.n_batches > 1
    for i in want:
        np.testing.assert_allclose(got[i], want[i], atol=1e-5)


def test_auto_on_the_cpu_is_sentence_batches(models):
    model, tokenizer = models["bert"]
    ex = extract_words(model, tokenizer, SENTENCES, batch_size=3, max_tokens="auto", progress=False)
    list(ex)
    assert ex.stats.n_batches == 3  # ceil(8 / 3)
    with pytest.raises(LexpInputError, match="max_tokens"):
        extract_words(model, tokenizer, SENTENCES, max_tokens="many")
    with pytest.raises(LexpInputError, match="max_tokens"):
        extract_cls(model, tokenizer, EXAMPLES, max_tokens=0)


def test_stats_as_dict_for_the_manifest(models):
    model, tokenizer = models["bert"]
    ex = extract_words(model, tokenizer, SENTENCES, batch_size=4, progress=False)
    list(ex)
    d = ex.stats.as_dict()
    n_words = sum(map(len, SENTENCES))
    assert d["n_words"] == n_words and d["n_items"] == 8 and d["n_batches"] == 2
    assert (
        d["padding_ratio"] == pytest.approx(d["n_padded_tokens"] / d["n_tokens"], abs=1e-4)
        and d["padding_ratio"] > 1
    )
    assert d["words_per_second"] > 0 and json.loads(json.dumps(d)) == d


# ---- the background writer ---------------------------------------------------------------------


def _store(path: Path, offsets: np.ndarray, width: int, write) -> Path:
    """A float16 store at ``path`` whose rows ``write(writer)`` stores; labels 0..n-1 mod 3."""
    n = int(offsets[-1])
    with StoreWriter(path, n_rows=n, n_layers=3, hidden=width // 3, dtype="float16", manifest={}) as w:
        write(w)
        w.finish(np.arange(n) % 3, offsets)
    return path


class _Replay:
    """An Extraction-like object that replays recorded batches."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self):
        return iter(self._batches)


def test_background_writer_store_is_byte_identical_to_a_synchronous_write(device, models, tmp_path):
    model, tokenizer = models["xlnet"]
    ex = extract_words(_on(model, device), tokenizer, SENTENCES, batch_size=3, progress=False)
    batches = [[(i, np.array(rows)) for i, rows in b] for b in ex.batches()]
    assert len(batches) == 3
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in SENTENCES])])

    def sync(w):
        for batch in batches:
            for i, rows in batch:
                w.write_rows(int(offsets[i]), rows)

    a = _store(tmp_path / "sync", offsets, 96, sync)
    b = _store(tmp_path / "thread", offsets, 96, lambda w: write_extraction(_Replay(batches), w, offsets))
    for name in ("activations.npy", "sentence_offsets.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    (la,), (lb,) = a.glob("labels/*/labels.npy"), b.glob("labels/*/labels.npy")
    assert la.relative_to(a) == lb.relative_to(b) and la.read_bytes() == lb.read_bytes()


def test_extraction_through_the_writer_thread_equals_a_plain_loop(models, tmp_path):
    """The whole path (extract_words batches -> thread -> StoreWriter) against today's loop."""
    model, tokenizer = models["bert"]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in SENTENCES])])

    def plain(w):
        for i, rows in extract_words(model, tokenizer, SENTENCES, batch_size=3, progress=False):
            w.write_rows(int(offsets[i]), np.atleast_2d(rows))

    def threaded(w):
        write_extraction(extract_words(model, tokenizer, SENTENCES, batch_size=3, progress=False), w, offsets)

    a, b = _store(tmp_path / "a", offsets, 96, plain), _store(tmp_path / "b", offsets, 96, threaded)
    assert (a / "activations.npy").read_bytes() == (b / "activations.npy").read_bytes()
    assert open_store(b).n_rows == offsets[-1]


def test_a_writer_thread_error_surfaces_in_the_caller(tmp_path):
    rows = np.ones((2, 6), dtype=np.float32)
    bad = rows.copy()
    bad[1, 3] = np.nan
    batches = [[(0, rows)], [(1, bad)], [(2, rows)], [(3, rows)], [(4, rows)]]  # sentence i: rows 2i, 2i+1
    with pytest.raises(LexpInputError, match="NaN or inf"):  # the store's own message, from the thread
        _store(
            tmp_path / "nan",
            np.arange(0, 11, 2),
            6,
            lambda w: write_extraction(_Replay(batches), w, np.arange(0, 11, 2)),
        )
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob("nan.partial-*"))


class _FailingWriter:
    def __init__(self, fail_at: int):
        self.calls, self.fail_at, self.thread = 0, fail_at, None

    def write_rows(self, offset, rows):
        self.thread = threading.current_thread().name
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")


def test_writer_error_is_raised_at_the_next_put_and_never_hangs_the_producer():
    writer = _FailingWriter(fail_at=1)
    with pytest.raises(OSError, match="No space left on device"):
        with BackgroundWriter(writer, max_batches=1) as bg:
            for k in range(200):  # far more batches than the queue holds: the thread keeps draining
                bg.put([(k, np.zeros((1, 2), dtype=np.float32))])
    assert writer.calls == 1 and writer.thread == "lexp-store-writer"


def test_writer_error_is_raised_at_close():
    writer = _FailingWriter(fail_at=2)
    bg = BackgroundWriter(writer, max_batches=3)
    with bg:
        bg.put([(0, np.zeros((1, 2))), (1, np.zeros((1, 2)))])
        with pytest.raises(OSError, match="No space left"):
            bg.close()


def test_a_caller_error_stops_the_thread_and_is_not_masked():
    writer = _FailingWriter(fail_at=1)
    bg = BackgroundWriter(writer)
    with pytest.raises(KeyError):
        with bg:
            bg.put([(0, np.zeros((1, 2)))])
            raise KeyError("extraction failed")
    assert not bg._thread.is_alive()


def test_report_counts_warns_on_every_run(caplog):
    counts = {"n_words": 10, "n_unk_words": 2, "n_windowed": 1, "n_windows": 3, "n_truncated": 0}
    with caplog.at_level(logging.WARNING, logger="lexp"):
        assert report_counts("dev", counts, reused=True) == counts
    assert "dev store (reused): 2 word(s)" in caplog.text and "1 long sentence(s) encoded in 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lexp"):
        report_counts("dev", {"n_words": 10, "n_unk_words": 0, "n_windowed": 0}, reused=False)
        assert report_counts("test", None, reused=True) == {"recorded": False}
    assert caplog.text == ""


# ---- the run: build_stores on the device, counts in results.json --------------------------------


def _run_cfg(tmp: Path, model_dir: Path, device: torch.device, *extra: str):
    from hydra import compose, initialize_config_dir

    from lexp.experiment import config_dir

    train, dev = tmp / "train.tsv", tmp / "dev.tsv"
    if not train.exists():
        zw = "\u200b"  # a zero-width space: no subword, encoded as [UNK]
        long = "the quick brown fox jump over the lazy dog and the old cat was run over the tree".split()
        sentences = [["the", "cat", zw, "run"], long, ["a", "dog", "."], ["the", "old", "house"]]
        text = "\n\n".join("\n".join(f"{w}\tX{len(w) % 3}" for w in s) for s in sentences) + "\n"
        train.write_text(text, encoding="utf-8")
        dev.write_text(text, encoding="utf-8")
    overrides = [
        "task=custom_columns",
        "task.name=tiny",
        f"task.files.train={train}",
        f"task.files.dev={dev}",
        "model.name=tiny",
        f"model.name_or_path={model_dir}",
        f"cache_dir={tmp / 'cache'}",
        f"device={device.type}",
        "extract.long_sentences=window",
        "extract.splits=[train,dev]",
        "logger=none",
        "progress=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _build(cfg, run_dir: Path):
    from lexp.experiment import RunContext, build_stores, read_task
    from lexp.report.results import Report

    ctx = RunContext(cfg=cfg, run_dir=run_dir, report=Report(run_dir), tracker=None)
    read_task(ctx)
    build_stores(ctx)
    return ctx, json.loads((run_dir / "results.json").read_text())


def test_build_stores_runs_on_the_device_and_reports_counts_on_every_run(
    device, models, tmp_path, caplog, monkeypatch
):
    import lexp.device

    monkeypatch.setattr(lexp.device, "_LOGGED", set())  # "logged once per stage" is per process
    model, tokenizer = models["short"]
    model_dir = save_model(model, tokenizer, tmp_path / "tiny-bert")
    with caplog.at_level(logging.INFO, logger="lexp"):
        ctx, first = _build(_run_cfg(tmp_path, model_dir, device), tmp_path / "run1")
    counts = first["extraction"]["train"]
    assert (counts["n_unk_words"], counts["n_windowed"]) == (1, 1) and counts["n_windows"] >= 2
    assert counts["device"] == str(torch.device(device.type, 0) if device.type == "cuda" else device)
    assert counts["precision"] == "32" and counts["model_dtype"] == "float32"
    assert counts["max_tokens"] == (32768 if device.type == "cuda" else None)
    assert "extract on" in caplog.text  # the stage's device, logged once
    assert "train store: 1 word(s) with zero subwords" in caplog.text
    manifest = json.loads((Path(first["stores"]["train"]) / "manifest.json").read_text())
    assert manifest["extraction"]["n_unk_words"] == 1 and manifest["settings"]["precision"] == "32"
    # rows equal the CPU reference of the first (short, windowless) sentence
    store = open_store(first["stores"]["train"])
    ref = _reference(model, tokenizer, ["the", "cat", "[UNK]", "run"], "last")
    np.testing.assert_allclose(store.read_rows(slice(0, 4)), ref, atol=2e-3)  # float16 store

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lexp"):
        _, again = _build(_run_cfg(tmp_path, model_dir, device, "extract.max_tokens=64"), tmp_path / "run2")
    assert again["stores_reused"] == {"train": True, "dev": True}  # batching is not in the fingerprint
    assert again["extraction"]["dev"] == first["extraction"]["dev"]  # read back from the manifest
    assert "train store (reused): 1 word(s)" in caplog.text and "dev store (reused)" in caplog.text

    _, bf16 = _build(_run_cfg(tmp_path, model_dir, device, "extract.precision=bf16-mixed"), tmp_path / "run3")
    assert bf16["stores_reused"] == {"train": False, "dev": False}  # precision is
    assert bf16["stores"]["train"] != first["stores"]["train"]
    assert bf16["extraction"]["train"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("family", ["bert", "xlnet"])
def test_float16_rows_cast_on_the_device_equal_a_host_cast(device, family, models, tmp_path):
    """rows_dtype=float16 (what a float16 store asks for): the same bits as casting the float32 rows
    on the host, so a float16 store holds the same bytes whichever side cast them; windows too."""
    model, tokenizer = models[family]
    on_device = _on(model, device)
    f32 = _collect(extract_words(on_device, tokenizer, SENTENCES, batch_size=3, progress=False), 8)
    ex = extract_words(on_device, tokenizer, SENTENCES, batch_size=3, rows_dtype="float16", progress=False)
    f16 = _collect(ex, len(SENTENCES))
    for i in range(len(SENTENCES)):
        assert f16[i].dtype == np.float16
        np.testing.assert_array_equal(f16[i].view(np.uint16), f32[i].astype(np.float16).view(np.uint16))
    windows = extract_words(
        on_device,
        tokenizer,
        SENTENCES,
        batch_size=3,
        max_length=16,
        long_sentences="window",
        rows_dtype="float16",
    )
    assert all(rows.dtype == np.float16 for _, rows in windows)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in SENTENCES])])

    def host_cast(w):
        for i, rows in f32.items():
            w.write_rows(int(offsets[i]), rows)

    def device_cast(w):
        for i, rows in f16.items():
            w.write_rows(int(offsets[i]), rows)

    a = _store(tmp_path / "host", offsets, f32[0].shape[1], host_cast)
    b = _store(tmp_path / "device", offsets, f32[0].shape[1], device_cast)
    assert (a / "activations.npy").read_bytes() == (b / "activations.npy").read_bytes()
    with pytest.raises(LexpInputError, match="rows_dtype"):
        extract_words(on_device, tokenizer, SENTENCES, rows_dtype="bfloat16")


def test_a_float16_store_refuses_inf_rows_and_names_the_range(tmp_path):
    """A float16 row that is inf (an activation beyond ±65504 cast on the device) is refused."""
    with StoreWriter(tmp_path / "s", n_rows=2, n_layers=2, hidden=3, manifest={}) as w:
        w.write_rows(0, np.ones((1, 6), dtype=np.float16))
        bad = np.ones((1, 6), dtype=np.float16)
        bad[0, 4] = np.float16(np.inf)
        with pytest.raises(LexpInputError, match="65504"):
            w.write_rows(1, bad)
        nan = np.full((1, 6), np.nan, dtype=np.float16)
        with pytest.raises(LexpInputError, match="NaN or inf"):
            w.write_rows(1, nan)
        w.write_rows(1, np.ones((1, 6), dtype=np.float16))
        w.finish(np.zeros(2, dtype=np.int64))
    assert open_store(tmp_path / "s").n_rows == 2

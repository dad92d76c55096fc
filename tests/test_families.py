"""The family matrix: every supported Hugging Face family through every path, with tiny random models.

Per family (tests/families.py: a tokenizer trained here in the family's own class, a 2-layer model):
word alignment against the tokenizer's own word_ids, the sentence vector against a hand-made one,
the word paths (extraction, oracle, layers, neurons, general, pipeline + its reduced extractor +
``lexp.predict``) and the sentence paths (fine-tuning, the representation store, probes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from families import FAMILIES, build_family
from lexp.encoders.extract import extract_cls, extract_words
from lexp.encoders.families import adapter_for
from lexp.encoders.loading import load_encoder
from lexp.errors import LexpInputError, LexpModelError
from lexp.experiment import config_dir, run
from lexp.redundancy.timing import truncate_encoder

NAMES = sorted(FAMILIES)
WORDS = [
    ["Hello", "world", ",", "unbelievable", "!"],
    ["The", "cat", "sat"],
    ["Dalvi", "et", "al.", "analysed", "redundancy", "in", "12", "transformers", "."],
]
PAIRS = [("A short one .", None), ("This sentence is a little longer than the first one .", None)]
WORD_RUN = [
    "task=pos",
    "limit.train=60",
    "limit.dev=20",
    "limit.test=20",
    "probe.epochs=2",
    "progress=false",
    "logger=none",
]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family-cache")


def _encoder(family: str, family_root: Path, data_root: Path):
    return load_encoder({"name": family, "name_or_path": str(build_family(family, family_root, data_root))})


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("family", NAMES)
def test_word_vector_is_one_of_its_own_subwords(family: str, family_root: Path, data_root: Path) -> None:
    """Per family: the row of every word is the hidden state of its last (first) subword as the
    tokenizer's own word_ids() give it, never a special token, on every layer."""
    enc = _encoder(family, family_root, data_root)
    tok, model = enc.tokenizer, enc.model
    adapter = adapter_for(model, tok)
    assert adapter.family == model.config.model_type and adapter.tokenizer_kind == FAMILIES[family][0]
    for subword in ("last", "first"):
        rows = dict(extract_words(model, tok, WORDS, subword=subword, progress=False, batch_size=2))
        for i, words in enumerate(WORDS):
            e = tok([words], is_split_into_words=True)
            word_ids = e.word_ids(0)
            with torch.inference_mode():
                states = model(
                    input_ids=torch.tensor(e["input_ids"]), output_hidden_states=True
                ).hidden_states
            expected = np.empty_like(rows[i])
            for w in range(len(words)):
                positions = [p for p, x in enumerate(word_ids) if x == w]
                pos = positions[-1] if subword == "last" else positions[0]
                assert e["input_ids"][0][pos] not in tok.all_special_ids or words[w] in tok.all_special_tokens
                expected[w] = torch.cat([h[0, pos] for h in states]).numpy()
            np.testing.assert_allclose(rows[i], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", NAMES)
def test_sentence_vector_per_family(family: str, family_root: Path, data_root: Path) -> None:
    """auto = the [CLS]/<cls> token where the tokenizer has one, else the last token (a decoder) or
    the mean (T5's encoder); mean = the mean over the tokens without specials. Batched (padded on the
    tokenizer's side) = one at a time."""
    enc = _encoder(family, family_root, data_root)
    tok, model = enc.tokenizer, enc.model
    expected_mode = FAMILIES[family][1]
    assert adapter_for(model, tok).sentence("auto") == expected_mode
    for mode in ("auto", "mean"):
        rows = dict(extract_cls(model, tok, PAIRS, sentence=mode, progress=False, batch_size=2))
        for i, (text, _) in enumerate(PAIRS):
            e = tok(text, return_special_tokens_mask=True)
            ids = e["input_ids"]
            with torch.inference_mode():
                states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            if (expected_mode if mode == "auto" else mode) == "mean":
                keep = [p for p, s in enumerate(e["special_tokens_mask"]) if not s]
                expected = torch.cat([h[0, keep].mean(0) for h in states])
            else:
                pos = len(ids) - 1
                if expected_mode == "cls":
                    pos = ids.index(tok.cls_token_id)
                expected = torch.cat([h[0, pos] for h in states])
            np.testing.assert_allclose(rows[i], expected.numpy(), atol=2e-5, rtol=1e-4)
    if expected_mode != "cls":
        with pytest.raises(LexpInputError, match="extract.sentence=cls"):
            adapter_for(model, tok).sentence("cls")


@pytest.mark.parametrize("family", NAMES)
def test_word_paths(
    family: str, family_root: Path, cache_root: Path, data_root: Path, tmp_path: Path
) -> None:
    """pos through every analysis; the pipeline's reduced extractor tags the test set as reported
    and lexp.predict tags raw text."""
    from lexp.predict import main as predict

    folder = build_family(family, family_root, data_root)
    if family == "deberta-v2":  # transformers' DeBERTa-v2 encoder cannot run without layers
        with pytest.raises(LexpModelError, match="cannot run with zero transformer layers"):
            truncate_encoder(_encoder(family, family_root, data_root).model, 0)
    base = [
        f"data_root={data_root}",
        f"cache_dir={cache_root}",
        f"model.name_or_path={folder}",
        f"model.name={family}",
    ]
    pipeline = ["analysis.timing.enabled=false", "analysis.ls_delta=0.0"] if family == "deberta-v2" else []
    out = run(
        _cfg(
            [
                *base,
                *WORD_RUN,
                *pipeline,
                "analysis=pipeline",
                "analysis.grid.step=40",
                "analysis.ranking_steps=50",
                "analysis.timing.sentences=8",
                "analysis.timing.repeats=1",
                "analysis.timing.classifier_rows=200",
                "analysis.timing.classifier_features=[10]",
                "analysis.timing.classifier_epochs=1",
                "analysis.timing.classifier_steps=2",
            ]
        ),
        tmp_path / "pipeline",
    )
    assert out["status"] == "complete" and out["n_layers"] == 3 and out["hidden"] == 32
    assert out["model_family"]["family"] == family
    assert out["model_family"]["tokenizer_kind"] == FAMILIES[family][0]
    assert out["model_family"]["sentence"] is None and out["model_family"]["word_alignment"] == "word_ids"
    ex = out["extractor"]
    assert ex["test_accuracy_reloaded"] == pytest.approx(ex["test_accuracy_reported"])
    text = tmp_path / "in.txt"
    text.write_text("The cat sat on the mat .\nDogs bark\n")
    tags = tmp_path / "tags.tsv"
    assert (
        predict([str(tmp_path / "pipeline"), "--input", str(text), "--output", str(tags), "--device", "cpu"])
        == 0
    )
    lines = [line.split("\t") for line in tags.read_text().splitlines() if line]
    assert [w for w, _ in lines] == "The cat sat on the mat . Dogs bark".split()
    assert {t for _, t in lines} <= set(out["labels"])
    for analysis, extra in (
        ("layers", []),
        ("neurons", ["analysis.grid.counts=[10,40]", "analysis.ranking_steps=50"]),
        ("general", ["analysis.ct=0.3"]),
    ):
        again = run(_cfg([*base, *WORD_RUN, f"analysis={analysis}", *extra]), tmp_path / analysis)
        assert again["status"] == "complete" and all(again["stores_reused"].values())


@pytest.mark.parametrize("family", NAMES)
def test_sentence_paths(
    family: str, family_root: Path, cache_root: Path, data_root: Path, tmp_path: Path, caplog
) -> None:
    """sst2: fine-tuning (AutoModelForSequenceClassification, pad token fixed for decoders), the
    store of the family's sentence vector, probes; the representation is recorded. The encoder
    read back from the fine-tuned folder has every weight (T5: T5EncoderModel out of the saved
    T5ForSequenceClassification), none randomly initialised."""
    folder = build_family(family, family_root, data_root)
    caplog.set_level(logging.WARNING)
    out = run(
        _cfg(
            [
                f"data_root={data_root}",
                f"cache_dir={cache_root}",
                f"model.name_or_path={folder}",
                f"model.name={family}",
                "task=sst2",
                "limit.train=16",
                "limit.dev=8",
                "limit.test=8",
                "finetune.epochs=1",
                "finetune.max_seq_length=64",
                "probe.epochs=2",
                "progress=false",
                "logger=none",
            ]
        ),
        tmp_path,
    )
    assert out["status"] == "complete" and out["rows"] == {"train": 16, "dev": 8, "test": 8}
    assert out["model_family"]["sentence"] == FAMILIES[family][1]
    assert 0.0 <= out["oracle"]["test"]["accuracy"] <= 1.0
    assert set(out["finetune"]["metrics"]) == {"dev", "test"}
    assert "randomly initialised" not in caplog.text


def test_cls_on_a_decoder_fails_before_fine_tuning(
    family_root: Path, data_root: Path, tmp_path: Path
) -> None:
    folder = build_family("gpt2", family_root, data_root)
    cfg = _cfg(
        [
            f"data_root={data_root}",
            f"cache_dir={tmp_path / 'cache'}",
            f"model.name_or_path={folder}",
            "task=sst2",
            "extract.sentence=cls",
            "limit.train=16",
            "limit.dev=8",
            "progress=false",
            "logger=none",
        ]
    )
    with pytest.raises(LexpInputError, match="extract.sentence=cls: the gpt2 tokenizer"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache" / "finetuned").exists()


def test_slow_only_tokenizer_is_one_clear_error(family_root: Path, data_root: Path) -> None:
    from lexp.encoders.families import require_fast

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(LexpModelError, match="not a fast"):
        require_fast(SlowTokenizer(), "somewhere")


def test_encoder_decoders_load_their_encoder_or_fail_clearly(data_root: Path, tmp_path: Path) -> None:
    """T5 is read through T5EncoderModel (its decoder never loaded, tested in the matrix above); an
    encoder-decoder without an encoder-only class (BART) is one error naming the fix, not the
    traceback of a forward that asks for decoder inputs."""
    import transformers as tf

    from families import _tokenizer, ewt_sentences
    from lexp.encoders.families import encoder_class, inspect_model
    from lexp.encoders.loading import load_encoder

    assert encoder_class(tf.T5Config()) is tf.AutoModelForTextEncoding
    assert encoder_class(tf.BertConfig()) is tf.AutoModel
    tok = _tokenizer("roberta", ewt_sentences(data_root, 50))
    config = tf.BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    tf.AutoModel.from_config(config).save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    with pytest.raises(LexpModelError, match="bart is an encoder-decoder model.*Fix: save its encoder"):
        load_encoder({"name_or_path": str(tmp_path / "bart")})
    with pytest.raises(LexpModelError, match="bart is an encoder-decoder model"):  # before fine-tuning
        inspect_model(tmp_path / "bart", sentence_task=True)


@pytest.mark.parametrize("family", [f for f in NAMES if f != "deberta-v2"])
def test_truncated_model_reproduces_its_layers(
    family: str, family_root: Path, data_root: Path, tmp_path: Path
) -> None:
    """truncate_encoder(model, k): its states are the full model's states 0..k (a decoder's final
    norm dropped below the top), and so is the saved-and-reloaded reduced extractor's encoder."""
    from lexp.extractor import ReducedExtractor, save_reduced_extractor

    enc = _encoder(family, family_root, data_root)
    full = dict(extract_words(enc.model, enc.tokenizer, WORDS, progress=False))
    for k in (0, 1):
        cut = dict(extract_words(truncate_encoder(enc.model, k), enc.tokenizer, WORDS, progress=False))
        for i in full:
            np.testing.assert_allclose(cut[i], full[i][:, : (k + 1) * 32], atol=2e-5, rtol=1e-4)
    kept = truncate_encoder(enc.model, 1, final_norm=True)
    base = getattr(enc.model, enc.model.base_model_prefix, enc.model)
    from lexp.encoders.families import final_norm_name

    save_reduced_extractor(
        tmp_path / "x",
        model=kept,
        tokenizer=enc.tokenizer,
        n_layers_kept=2,
        columns=np.arange(64),
        weights=np.zeros((2, 64), np.float32),
        bias=np.zeros(2, np.float32),
        labels=["a", "b"],
        kind="labelling",
        settings={"store_dtype": "float32"},
        drop_final_norm=final_norm_name(base) is not None,
    )
    tagger = ReducedExtractor.load(tmp_path / "x")
    np.testing.assert_allclose(
        tagger.features(WORDS),
        np.concatenate([full[i][:, :64] for i in range(len(WORDS))]),
        atol=2e-5,
        rtol=1e-4,
    )

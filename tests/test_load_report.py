"""Loading prints one lexp line, not transformers' load-report table, and flags random weights."""

from __future__ import annotations

import logging

import pytest

from lexp.encoders.finetune import SEQUENCE_HEADS
from lexp.encoders.loading import load_pretrained
from tiny_models import save_model, tiny_bert


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bert")
    return save_model(*tiny_bert(tmp), tmp / "model")


def test_new_classification_head_is_info_not_warning(bert_dir, caplog, capfd) -> None:
    from transformers import AutoModelForSequenceClassification

    with caplog.at_level(logging.DEBUG, logger="lexp"):
        model = load_pretrained(
            AutoModelForSequenceClassification, bert_dir, new_head=SEQUENCE_HEADS, num_labels=3
        )
    assert model.classifier.out_features == 3
    records = [r for r in caplog.records if r.name.startswith("lexp")]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "classifier.weight" in records[0].getMessage() and "classifier.bias" in records[0].getMessage()
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err


def test_weights_missing_outside_a_new_head_are_a_warning(bert_dir, caplog) -> None:
    from transformers import BertForMaskedLM

    with caplog.at_level(logging.INFO, logger="lexp"):
        load_pretrained(BertForMaskedLM, bert_dir, new_head=SEQUENCE_HEADS)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "randomly initialised" in warned[0]
    # BertModel has no MLM head: its 6 weights (sorted, first 5 named) start random.
    assert "6 weights" in warned[0] and "cls.predictions.bias, cls.predictions.decoder.bias" in warned[0]


def test_transformers_logging_is_restored(bert_dir) -> None:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    load_pretrained(AutoModel, bert_dir)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


def test_a_missing_pooler_is_not_a_warning_for_the_encoder(bert_dir, tmp_path, caplog) -> None:
    """A fine-tuned RoBERTa is saved without a pooler (its classifier reads <s>); RobertaModel of that
    folder draws one. lexp reads hidden states only, so that is debug, while other missing encoder
    weights still warn."""
    from transformers import AutoModel, BertModel

    from lexp.encoders.loading import UNREAD

    no_pooler = BertModel.from_pretrained(bert_dir, add_pooling_layer=False)
    no_pooler.save_pretrained(tmp_path / "m")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lexp"):
        load_pretrained(AutoModel, tmp_path / "m", unread=UNREAD)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("lexp")]
    assert any("never read by lexp: pooler.dense.bias" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lexp"):
        load_pretrained(AutoModel, tmp_path / "m")  # without unread: the old warning
    assert [r.levelno for r in caplog.records if r.name.startswith("lexp")] == [logging.WARNING]

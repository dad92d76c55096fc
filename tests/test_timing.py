"""Truncated encoders (exact hidden states), FLOP proxy, and the structure of timing records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, XLNetConfig, XLNetModel

from lexp.errors import LexpInputError, LexpModelError
from lexp.redundancy.timing import (
    classifier_timing,
    encoder_depth,
    forward_flops,
    forward_speedups,
    forward_time,
    time_call,
    truncate_encoder,
)


def tiny_bert(n_layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=32
    )
    return BertModel(config).eval()


def tiny_xlnet(n_layers: int = 3) -> XLNetModel:
    torch.manual_seed(0)
    return XLNetModel(XLNetConfig(vocab_size=60, d_model=16, n_layer=n_layers, n_head=2, d_inner=32)).eval()


def batch(seed: int = 0, size: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 6:] = 0  # one padded sentence
    return {"input_ids": torch.randint(5, 60, (size, length), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("make", [tiny_bert, tiny_xlnet])
def test_truncated_last_hidden_state_is_hidden_state_k(make) -> None:
    model, inputs = make(), batch()
    depth = encoder_depth(model)
    with torch.inference_mode():
        full = model(**inputs, output_hidden_states=True)
        assert len(full.hidden_states) == depth + 1
        for k in range(depth + 1):
            truncated = truncate_encoder(model, k)
            assert encoder_depth(truncated) == k
            torch.testing.assert_close(truncated(**inputs).last_hidden_state, full.hidden_states[k])
            # the truncated model records its own hidden states; the full model is untouched
            if k:
                assert len(truncated(**inputs, output_hidden_states=True).hidden_states) == k + 1
        again = model(**inputs, output_hidden_states=True)
    assert encoder_depth(model) == depth and len(again.hidden_states) == depth + 1
    torch.testing.assert_close(again.last_hidden_state, full.last_hidden_state)


def test_truncated_model_used_first_leaves_no_hooks_on_the_original() -> None:
    # transformers installs hidden-state recording hooks lazily on first use; if the copy shared
    # hook containers with the original, the original would later record every layer twice.
    model, inputs = tiny_bert(), batch()
    with torch.inference_mode():
        assert len(truncate_encoder(model, 2)(**inputs, output_hidden_states=True).hidden_states) == 3
        assert len(model(**inputs, output_hidden_states=True).hidden_states) == 5


def test_truncation_shares_weights_and_copies_the_config() -> None:
    model = tiny_bert()
    truncated = truncate_encoder(model, 2)
    assert truncated.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    assert truncated.encoder.layer[1].output.dense.weight is model.encoder.layer[1].output.dense.weight
    assert truncated.embeddings.word_embeddings.weight is model.embeddings.word_embeddings.weight
    assert tiny_xlnet().n_layer == 3 and truncate_encoder(tiny_xlnet(), 1).n_layer == 1


def test_truncation_finds_the_encoder_inside_a_task_model() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert(3).config).eval()
    truncated = truncate_encoder(model, 1)
    assert len(truncated.bert.encoder.layer) == 1 and len(model.bert.encoder.layer) == 3
    with torch.inference_mode():
        assert truncated(**batch()).logits.shape == (3, 2)


def test_truncation_errors() -> None:
    with pytest.raises(LexpModelError, match="cannot truncate Sequential"):
        truncate_encoder(nn.Sequential(nn.Linear(2, 2)), 1)
    for k in (-1, 5, 1.5, True):
        with pytest.raises(LexpInputError, match=r"in \[0, 4\]"):
            truncate_encoder(tiny_bert(), k)


def test_forward_flops_grow_linearly_with_the_layers_kept() -> None:
    model, inputs = tiny_bert(6), batch()
    flops = [forward_flops(model, inputs, k) for k in range(7)]
    per_layer = flops[1] - flops[0]
    assert per_layer > 0 and all(b - a == per_layer for a, b in zip(flops, flops[1:], strict=False))
    assert forward_flops(model, inputs) == flops[6]
    assert flops[6] / flops[1] > 5  # LS keeping 1 of 6 layers does > 5x less work


def test_forward_timing_records() -> None:
    model, batches = tiny_bert(6), [batch(0), batch(1, size=2)]
    records = forward_speedups(model, batches, [0, 2], repeats=2)
    assert [r["n_layers"] for r in records] == [6, 0, 2]
    for r in records:
        assert r["n_sentences"] == 5 and len(r["runs"]) == 2 and r["seconds"] > 0
        assert r["seconds_per_sentence"] == pytest.approx(r["seconds"] / 5)
        assert r["speedup"] == pytest.approx(records[0]["seconds"] / r["seconds"])
    assert records[0]["speedup"] == 1.0
    one = forward_time(model, batches, 3, repeats=1)
    assert one["n_layers"] == 3 and one["full_seconds_per_sentence"] > 0
    assert forward_time(model, batches, repeats=1)["n_layers"] == 6
    assert model.training is False and encoder_depth(model) == 6
    json.dumps(records)
    with pytest.raises(LexpInputError, match="no tensor"):
        forward_time(model, [{"input_ids": None}])


def test_classifier_timing_records() -> None:
    records = classifier_timing(n_rows=700, feature_counts=[8, 32], n_classes=3, epochs=2, repeats=2)
    assert [r["n_features"] for r in records] == [8, 32]
    for r in records:
        assert len(r["train_runs"]) == 2 and r["train_seconds"] > 0 and r["predict_seconds"] > 0
    json.dumps(records)
    with pytest.raises(LexpInputError, match="positive"):
        classifier_timing(n_rows=10, feature_counts=[0])
    with pytest.raises(LexpInputError, match="steps"):
        classifier_timing(n_rows=10, feature_counts=[4], steps=0)


def test_classifier_timing_times_the_probes_own_step(monkeypatch, device) -> None:
    """Figure 5 times the step every probe of a run takes (FusedHeads + ElasticNetAdam) on the run's
    device, and ``steps`` times a sample of it, scaled to the full pass."""
    from lexp.probes import ElasticNetAdam, FusedHeads

    calls = {"step": 0, "update": 0, "rows": 0}
    step, update = FusedHeads.loss_and_grad, ElasticNetAdam.update

    def counted_step(self, x, y, **kw):
        calls["step"] += 1
        calls["rows"] += x.shape[0]
        assert x.device.type == device.type and self.weight.device.type == device.type
        return step(self, x, y, **kw)

    def counted_update(self):
        calls["update"] += 1
        return update(self)

    monkeypatch.setattr(FusedHeads, "loss_and_grad", counted_step)
    monkeypatch.setattr(ElasticNetAdam, "update", counted_update)
    records = classifier_timing(
        n_rows=1000, feature_counts=[16], n_classes=3, epochs=3, repeats=2, steps=5, device=device
    )
    (r,) = records
    assert r["train_steps"] == 3 * 8 and r["train_steps_timed"] == 5 and r["device"] == str(device)
    assert calls["step"] == calls["update"] == 5 * 3  # 5 timed steps in the warm-up + 2 repeats
    assert calls["rows"] == 5 * 3 * 128
    full = classifier_timing(n_rows=300, feature_counts=[4], n_classes=2, epochs=2, repeats=1, device=device)
    assert full[0]["train_steps"] == full[0]["train_steps_timed"] == 2 * 3


def test_forward_timing_on_the_models_device(device) -> None:
    """Batches are moved to the model's device once; the truncated models share its weights there."""
    model, batches = tiny_bert(4).to(device), [batch(0)]
    records = forward_speedups(model, batches, [1], repeats=1)
    assert [r["n_layers"] for r in records] == [4, 1] and all(r["seconds"] > 0 for r in records)
    assert batches[0]["input_ids"].device.type == "cpu"  # the caller's batches are left alone


def test_time_call() -> None:
    result, seconds = time_call(sum, [1, 2, 3])
    assert result == 6 and seconds >= 0

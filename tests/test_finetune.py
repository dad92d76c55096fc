"""Fine-tuning for sentence tasks: tiny random BERT / XLNet models on constructed tasks with known answers."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lexp.encoders.finetune import (
    EpochShuffleSampler,
    FineTuneConfig,
    FineTuner,
    GlueDataModule,
    PadCollator,
    encode_examples,
    finetune,
    load_tokenizer,
    read_manifest,
)
from lexp.errors import LexpInputError
from lexp.tasks.base import Example, Sentence, TaskData
from tiny_models import save_model, tiny_bert, tiny_xlnet

REPO = Path(__file__).resolve().parents[1]
FILLER = "the a movie film plot actor was is very really quite and of".split()
KEYWORDS = ("good", "bad")
QUIET = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}
# Tiny models learn in seconds only with a larger step than the paper's 5e-5.
FAST = {"learning_rate": 3e-3, "epochs": 6, "batch_size": 16, "max_seq_length": 64, "seed": 42}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from two threads, and on a busy 2-core machine OpenMP spinning made
    them 15× slower (measured: 2.6 s vs 38.6 s for one fine-tuning run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 32-wide BERT with a WordPiece vocabulary written here (no dropout: exact resumes)."""
    tmp = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *KEYWORDS, *FILLER, "##s"]
    model, tokenizer = tiny_bert(tmp, max_positions=64, vocab=vocab, dropout=0.0)
    return save_model(model, tokenizer, tmp / "tiny-bert")


@pytest.fixture(scope="module")
def xlnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 32-wide XLNet with a unigram sentencepiece model trained here (no dropout)."""
    tmp = tmp_path_factory.mktemp("xlnet")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(FILLER + list(KEYWORDS)) for _ in range(8)) for _ in range(400)]
    model, tokenizer = tiny_xlnet(tmp, dropout=0.0, sp_corpus=corpus, sp_vocab=60)
    return save_model(model, tokenizer, tmp / "tiny-xlnet")


# -------------------------------------------------------------------------------------------- tasks
def _sentence(rng: random.Random, keyword: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    words.insert(rng.randrange(len(words) + 1), keyword)
    return " ".join(words)


def pair_task(folder: Path, *, n_train: int = 192, n_eval: int = 64, regression: bool = False) -> TaskData:
    """text_b's keyword decides the label; text_a carries an independent decoy keyword.

    A model that did not see text_b (pairs not encoded as pairs) is at chance. For regression the
    score is 5 × the share of "good" among text_b's two keywords: 0, 2.5 or 5.
    """
    rng = random.Random(7)
    splits: dict[str, list[Example]] = {}
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        rows = []
        for i in range(n):
            decoy = rng.choice(KEYWORDS)
            if regression:
                keys = [rng.choice(KEYWORDS), rng.choice(KEYWORDS)]
                text_b = _sentence(rng, " ".join(keys))
                label: str | float = 5.0 * keys.count("good") / 2
            else:
                key = rng.choice(KEYWORDS)
                text_b = _sentence(rng, key)
                label = "1" if key == "good" else "0"
            rows.append(Example(_sentence(rng, decoy), text_b, label, f"{folder}/{split}.tsv:{i + 2}"))
        splits[split] = rows
    files = []
    for split, rows in splits.items():
        path = folder / f"{split}.tsv"
        path.write_text("".join(f"{e.text_a}\t{e.text_b}\t{e.label}\n" for e in rows))
        files.append(path)
    kind = "regression" if regression else "classification"
    labels = [] if regression else ["0", "1"]
    return TaskData("toy-sts" if regression else "toy", kind, splits, labels, files, {"carved_dev": 0.1})


class Recorder(Callback):
    """What the training loop did: global step before each batch, losses, and the train/eval mode."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.training: list[bool] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: FineTuner, batch: dict, batch_idx: int
    ) -> None:
        self.steps.append(trainer.global_step)
        self.training.append(module.model.training)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: FineTuner, outputs: dict, batch: dict, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class Interrupted(RuntimeError):
    pass


class InterruptAtEpoch(Callback):
    """Simulates a crash at the start of an epoch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, module: FineTuner) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"stopped at epoch {self.epoch}")


def _steps(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def _logits_and_accuracy(folder: Path, task: TaskData, split: str) -> tuple[torch.Tensor, float]:
    """Reload the saved classifier and score a split (independent of the FineTuner code path)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    rows = task.splits[split]
    enc = tokenizer([e.text_a for e in rows], [e.text_b for e in rows], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits
    target = torch.from_numpy(task.encode_labels(split)[0])
    return logits, float((logits.argmax(-1) == target).float().mean())


# -------------------------------------------------------------------------------------------- BERT
@pytest.fixture(scope="module")
def bert_run(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("bert-run")
    task = pair_task(folder)
    recorder = Recorder()
    model_cfg = {"name": "tiny-bert", "name_or_path": str(bert_dir)}
    ft_cfg = {**FAST, "metrics": ["accuracy", "f1"]}
    out = finetune(
        task,
        model_cfg,
        ft_cfg,
        cache_root=folder / "cache",
        trainer_kwargs={**QUIET, "callbacks": [recorder]},
    )
    return {
        "out": out,
        "task": task,
        "model": model_cfg,
        "ft": ft_cfg,
        "cache": folder / "cache",
        "rec": recorder,
    }


def test_bert_pair_task_beats_chance_and_saves_the_encoder(bert_run: dict) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    out, task, recorder = bert_run["out"], bert_run["task"], bert_run["rec"]
    assert out.parent.parent == bert_run["cache"] / "finetuned"
    assert (
        out.parent.name == "tiny-bert" and out.name.startswith("toy-") and len(out.name) == len("toy-") + 12
    )
    assert not out.with_name(out.name + ".partial").exists()
    assert not (out / "checkpoints").exists()  # removed unless keep_checkpoints
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    manifest = read_manifest(out)
    assert manifest["complete"] is True and manifest["fingerprint"].startswith(out.name[-12:])
    assert manifest["metrics"]["dev"]["accuracy"] >= 0.9  # chance is ~0.5: the decoy in text_a is independent
    assert manifest["metrics"]["test"]["accuracy"] >= 0.9
    assert 0.9 <= manifest["metrics"]["dev"]["f1"] <= 1.0
    assert manifest["examples"] == {"train": 192, "dev": 64, "test": 64}
    assert manifest["global_step"] == 6 * _steps(192, 16)
    assert manifest["timing"]["train_examples"] == 6 * 192
    assert manifest["timing"]["train_examples_per_s"] > 0
    assert manifest["truncated"] == {"train": 0, "dev": 0, "test": 0}
    # transformers 5 loads models in eval mode; fine-tuning must train in train mode (dropout on).
    assert recorder.training and all(recorder.training)
    assert np.mean(recorder.losses[-4:]) < 0.5 * np.mean(recorder.losses[:4])

    # The saved classifier is the evaluated one: scoring it independently gives the same accuracy.
    logits, accuracy = _logits_and_accuracy(out, task, "dev")
    assert accuracy == pytest.approx(manifest["metrics"]["dev"]["accuracy"], abs=1e-6)

    # AutoModel gives the fine-tuned encoder without the head, offline; its [CLS] vector is what
    # the head consumes (pooler → classifier reproduces the logits).
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    encoder = AutoModel.from_pretrained(out, local_files_only=True).eval()
    assert type(encoder).__name__ == "BertModel"
    classifier = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert classifier.config.id2label == {0: "0", 1: "1"}
    rows = task.splits["dev"][:8]
    enc = tokenizer([e.text_a for e in rows], [e.text_b for e in rows], padding=True, return_tensors="pt")
    assert enc["token_type_ids"].max() == 1  # pairs encoded as pairs
    with torch.inference_mode():
        hidden = encoder(**enc).last_hidden_state
        cls = hidden[:, 0]
        torch.testing.assert_close(cls, classifier.bert(**enc).last_hidden_state[:, 0])
        recomputed = classifier.classifier(classifier.bert.pooler(hidden))
    torch.testing.assert_close(recomputed, logits[:8], rtol=1e-4, atol=1e-5)


def test_cached_model_is_reused_without_training(bert_run: dict) -> None:
    out = bert_run["out"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    recorder = Recorder()
    again = finetune(
        bert_run["task"],
        bert_run["model"],
        # evaluation-only settings do not change the weights, so they reuse the folder too
        {**bert_run["ft"], "eval_batch_size": 7, "num_workers": 0},
        cache_root=bert_run["cache"],
        trainer_kwargs={**QUIET, "callbacks": [recorder]},
    )
    assert again == out
    assert recorder.steps == []  # not a single training batch
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_fingerprint_changes_with_hyperparameters_and_data(
    bert_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lexp.encoders import finetune as ft

    calls: list[Path] = []

    def fake_train(*args: object, **kwargs: object) -> Path:
        out = args[7]  # (task, name_or_path, revision, slug, config, settings, fp, out, trainer_kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(ft, "_train_and_save", fake_train)
    base = dict(task_data=bert_run["task"], model=bert_run["model"], cache_root=bert_run["cache"])
    assert finetune(**base, ft_cfg=bert_run["ft"], trainer_kwargs=QUIET) == bert_run["out"]
    assert calls == []
    other_lr = finetune(**base, ft_cfg={**bert_run["ft"], "learning_rate": 1e-3}, trainer_kwargs=QUIET)
    two_devices = finetune(**base, ft_cfg=bert_run["ft"], trainer_kwargs={**QUIET, "devices": 2})
    task = bert_run["task"]
    edited = tmp_path / "train.tsv"
    edited.write_text(task.files[0].read_text() + "one more row\n")
    changed = TaskData(task.name, task.kind, task.splits, task.labels, [edited, *task.files[1:]], task.notes)
    other_data = finetune(**{**base, "task_data": changed}, ft_cfg=bert_run["ft"], trainer_kwargs=QUIET)
    assert calls == [other_lr, two_devices, other_data]
    assert len({bert_run["out"], other_lr, two_devices, other_data}) == 4


# ------------------------------------------------------------------------------------------- XLNet
def test_xlnet_pair_task_pads_left_and_uses_the_last_token(xlnet_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    task = pair_task(tmp_path)
    out = finetune(
        task,
        {"name": "tiny-xlnet", "name_or_path": str(xlnet_dir)},
        FAST,
        cache_root=tmp_path / "cache",
        trainer_kwargs=QUIET,
    )
    manifest = read_manifest(out)
    assert manifest["metric_names"] == ["accuracy"]
    assert manifest["metrics"]["dev"]["accuracy"] >= 0.85, manifest["metrics"]
    logits, accuracy = _logits_and_accuracy(out, task, "dev")
    assert accuracy == pytest.approx(manifest["metrics"]["dev"]["accuracy"], abs=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.padding_side == "left"
    # XLNet takes segment ids for pairs (as run_glue.py passed them); the saved tokenizer returns them.
    assert "token_type_ids" in tokenizer.model_input_names
    encoder = AutoModel.from_pretrained(out, local_files_only=True).eval()
    assert type(encoder).__name__ == "XLNetModel"
    classifier = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    rows = task.splits["dev"][:8]
    enc = tokenizer([e.text_a for e in rows], [e.text_b for e in rows], padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, -1] == tokenizer.cls_token_id).all()  # <cls> last, padding on the left
    assert (enc["attention_mask"][:, 0] == 0).any()
    with torch.inference_mode():
        hidden = encoder(**enc).last_hidden_state
        recomputed = classifier.logits_proj(classifier.sequence_summary(hidden))
    torch.testing.assert_close(recomputed, logits[:8], rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------- regression
def test_regression_learns_a_score(bert_dir: Path, tmp_path: Path) -> None:
    task = pair_task(tmp_path, regression=True)
    recorder = Recorder()
    out = finetune(
        task,
        {"name": "tiny-bert", "name_or_path": str(bert_dir)},
        {**FAST, "epochs": 10},
        cache_root=tmp_path / "cache",
        trainer_kwargs={**QUIET, "callbacks": [recorder]},
    )
    manifest = read_manifest(out)
    dev = manifest["metrics"]["dev"]
    assert set(dev) == {"loss", "pearson", "spearman"}
    assert dev["pearson"] > 0.5 and dev["spearman"] > 0.5
    targets = task.encode_labels("dev")[0]
    assert dev["loss"] < 0.5 * float(np.var(targets))  # better than predicting the mean
    assert np.mean(recorder.losses[-4:]) < 0.5 * np.mean(recorder.losses[:4])

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.problem_type == "regression"


# ---------------------------------------------------------------------------- checkpoints / resume
def test_checkpoint_loads_weights_only_and_fit_resumes(bert_dir: Path, tmp_path: Path) -> None:
    task = pair_task(tmp_path, n_train=64, n_eval=16)
    tokenizer = load_tokenizer(bert_dir)
    data = GlueDataModule.from_task(task, tokenizer, batch_size=16)
    pl.seed_everything(0, verbose=False)
    module = FineTuner(str(bert_dir), labels=["0", "1"], learning_rate=1e-3)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_epochs=1, callbacks=[saver], logger=False, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, datamodule=data)
    last = tmp_path / "ckpt" / "last.ckpt"

    checkpoint = torch.load(last, weights_only=True)  # primitive hyper-parameters only: no pickle needed
    assert checkpoint["hyper_parameters"]["labels"] == ["0", "1"]
    assert checkpoint["global_step"] == 4
    reloaded = FineTuner.load_from_checkpoint(last)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)

    recorder = Recorder()
    resumed = pl.Trainer(
        max_epochs=2,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **QUIET,
    )
    resumed.fit(
        FineTuner(str(bert_dir), labels=["0", "1"], learning_rate=1e-3), datamodule=data, ckpt_path=last
    )
    assert recorder.steps == [4, 5, 6, 7]  # continues from the saved global step, one more epoch
    assert resumed.global_step == 8 and resumed.current_epoch == 2


def test_interrupted_finetune_resumes_to_the_same_model(bert_dir: Path, tmp_path: Path) -> None:
    """Crash after epoch 1 of 3, run again: it resumes from the checkpoint and ends where an
    uninterrupted run ends (same order per epoch, same schedule, same optimiser state)."""
    task = pair_task(tmp_path, n_train=64, n_eval=16)
    model = {"name": "tiny-bert", "name_or_path": str(bert_dir)}
    ft_cfg = {**FAST, "learning_rate": 1e-3, "epochs": 3}
    with pytest.raises(Interrupted):
        finetune(
            task,
            model,
            ft_cfg,
            cache_root=tmp_path / "a",
            trainer_kwargs={**QUIET, "callbacks": [InterruptAtEpoch(1)]},
        )
    (partial,) = (tmp_path / "a" / "finetuned" / "tiny-bert").glob("*.partial")
    last = partial / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4

    recorder = Recorder()
    out = finetune(
        task, model, ft_cfg, cache_root=tmp_path / "a", trainer_kwargs={**QUIET, "callbacks": [recorder]}
    )
    assert recorder.steps == list(range(4, 12))
    manifest = read_manifest(out)
    assert manifest["resumed_from"] == str(last) and manifest["global_step"] == 12
    assert not partial.exists()

    straight = finetune(task, model, ft_cfg, cache_root=tmp_path / "b", trainer_kwargs=QUIET)
    assert straight.name == out.name  # same fingerprint, different cache root
    from safetensors.torch import load_file

    resumed_weights, straight_weights = (
        load_file(out / "model.safetensors"),
        load_file(straight / "model.safetensors"),
    )
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)
    assert read_manifest(straight)["metrics"]["dev"] == pytest.approx(manifest["metrics"]["dev"], abs=1e-5)


# ---------------------------------------------------------------------------------------- metrics
def test_unseen_labels_count_as_errors_and_f1_uses_the_positive_class(bert_dir: Path, tmp_path: Path) -> None:
    """A head forced to always predict "1": accuracy and F1 have known values."""
    tokenizer = load_tokenizer(bert_dir)
    texts = ["good movie", "bad film", "the plot", "a movie", "very good"]
    dev = [Example(t, None, "?", f"dev.tsv:{i + 2}") for i, t in enumerate(texts)]
    targets = np.array([1, 1, 0, 0, 2])  # id 2: a dev label unseen in train
    data = GlueDataModule(tokenizer, {"dev": dev}, {"dev": targets}, eval_batch_size=2)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, **QUIET)
    for positive, f1 in (("1", 2 * 0.4 * 1.0 / 1.4), ("0", 0.0)):
        module = FineTuner(
            str(bert_dir), labels=["0", "1"], metrics=["accuracy", "f1"], positive_label=positive
        )
        with torch.no_grad():
            module.model.classifier.weight.zero_()
            module.model.classifier.bias.copy_(torch.tensor([-10.0, 10.0]))
        (scores,) = trainer.validate(module, datamodule=data, verbose=False)
        assert scores["dev/accuracy"] == pytest.approx(2 / 5)  # the unseen label is an error, not dropped
        assert scores["dev/f1"] == pytest.approx(f1)
        assert math.isfinite(scores["dev/loss"])


# ------------------------------------------------------------------------------------------- data
def test_shuffling_is_seeded_per_epoch() -> None:
    sampler = EpochShuffleSampler(50, seed=42)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(EpochShuffleSampler(50, seed=42)) == first
    assert list(EpochShuffleSampler(50, seed=43)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(50))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_padding_follows_the_tokenizer_side() -> None:
    items = [
        (np.array([5, 6, 7], np.int32), np.array([0, 0, 1], np.int8), 1),
        (np.array([8], np.int32), np.array([0], np.int8), 0),
    ]
    right = PadCollator(pad_token_id=0, pad_token_type_id=3, padding_side="right")(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["token_type_ids"].tolist() == [[0, 0, 1], [0, 3, 3]]
    left = PadCollator(pad_token_id=9, padding_side="left")(items)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [1, 0]


def test_truncation_is_counted_not_hidden(bert_dir: Path) -> None:
    tokenizer = load_tokenizer(bert_dir)
    rows = [
        Example("good " * 10, "bad " * 10, "1", "t.tsv:2"),  # 23 tokens with [CLS] and two [SEP]
        Example("good " * 4, "bad " * 3, "0", "t.tsv:3"),  # 10 tokens: exactly max_length, not cut
        Example("good", "bad", "0", "t.tsv:4"),
    ]
    encoded = encode_examples(tokenizer, rows, np.array([1, 0, 0]), max_length=10)
    assert encoded.n_truncated == 1
    assert encoded.lengths().tolist() == [10, 10, 5]
    first = tokenizer.convert_ids_to_tokens(encoded[0][0].tolist())
    # Cut longest-first to 7 words: both texts keep their share, the special tokens stay.
    assert first[0] == "[CLS]" and first[-1] == "[SEP]" and first.count("[SEP]") == 2
    assert first.count("good") >= 3 and first.count("bad") >= 3


def test_bad_input_is_reported(bert_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(bert_dir)
    mixed = [Example("good", "bad", "1", "x.tsv:2"), Example("good", None, "0", "x.tsv:3")]
    with pytest.raises(LexpInputError, match=r"x\.tsv:3: expected a sentence pair"):
        encode_examples(tokenizer, mixed, np.array([1, 0]), max_length=16)

    sentence = Sentence(("good",), ("JJ",), "p.conllu:1")
    labelling = TaskData("pos", "labelling", {"train": [sentence], "dev": [sentence]}, ["JJ"], [], {})
    with pytest.raises(LexpInputError, match="labelling task"):
        finetune(labelling, str(bert_dir), {}, cache_root=tmp_path)
    with pytest.raises(LexpInputError, match="unknown fine-tuning setting.*'lr'"):
        finetune(pair_task(tmp_path), str(bert_dir), {"lr": 1e-3}, cache_root=tmp_path)
    with pytest.raises(LexpInputError, match="exceeds the 64 positions"):
        finetune(
            pair_task(tmp_path),
            str(bert_dir),
            {"max_seq_length": 128},
            cache_root=tmp_path,
            trainer_kwargs=QUIET,
        )
    with pytest.raises(LexpInputError, match="positive_label='yes'"):
        FineTuner(str(bert_dir), labels=["0", "1"], metrics=["accuracy", "f1"], positive_label="yes")
    with pytest.raises(LexpInputError, match="do not apply to classification"):
        FineTuner(str(bert_dir), labels=["0", "1"], metrics=["pearson"])


def test_config_file_holds_the_paper_defaults() -> None:
    """conf/finetune/default.yaml = transformers' run_glue.py defaults used by the paper."""
    raw = OmegaConf.merge(
        {"seed": 42}, {"finetune": OmegaConf.load(REPO / "conf" / "finetune" / "default.yaml")}
    )
    config = FineTuneConfig.from_mapping(OmegaConf.to_container(raw.finetune, resolve=True))
    assert config == FineTuneConfig()
    assert (config.learning_rate, config.epochs, config.batch_size, config.max_seq_length) == (
        5e-5,
        3,
        8,
        128,
    )
    assert (config.weight_decay, config.warmup_steps, config.seed) == (0.0, 0, 42)
    assert json.dumps(config.weight_settings())  # fingerprintable

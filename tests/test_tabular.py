"""task=custom_sentences / task=custom_tokens: tables from CSV, TSV, JSONL, Parquet, save_to_disk
folders and the offline HF datasets cache, built here from the shared SST-2 and EWT data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.schema import check_config
from lexp.store import label_fingerprint, open_store, sentences_digest
from lexp.tasks import load_task, read_columns
from lexp.tasks.glue import read_glue
from lexp.tasks.tabular import check_lengths

datasets.disable_progress_bars()

N_TRAIN, N_DEV, N_TEST = 150, 50, 50
QUICK = ["probe.epochs=3", "progress=false", "logger=none"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _ewt(data_root: Path, split: str, n: int):
    path = data_root / "ud_english_ewt" / f"en_ewt-ud-{split}.conllu"
    kw = {"word_column": 1, "label_column": 4, "separator": "\t", "comment_prefix": "#", "min_columns": 10}
    return read_columns(path, **kw)[:n]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ewt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first EWT sentences of each split as save_to_disk folders (xpos as ClassLabel ids),
    Parquet written by datasets (ClassLabel kept) and JSONL with string tags."""
    out = tmp_path_factory.mktemp("ewt")
    sentences = {
        "train": _ewt(data_root, "train", N_TRAIN),
        "dev": _ewt(data_root, "dev", N_DEV),
        "test": _ewt(data_root, "test", N_TEST),
    }
    # The ClassLabel names: task=pos's vocabulary (its capped train), as a Hub copy would declare
    pos = OmegaConf.to_container(_cfg([f"data_root={data_root}", "task=pos"]).task, resolve=True)
    names = load_task(pos).labels  # type: ignore[arg-type]
    assert {t for split in sentences.values() for s in split for t in s.labels} <= set(names)
    features = datasets.Features(
        {
            "tokens": datasets.List(datasets.Value("string")),
            "xpos": datasets.List(datasets.ClassLabel(names=names)),
        }
    )
    for split, items in sentences.items():
        data = {
            "tokens": [list(s.words) for s in items],
            "xpos": [[names.index(t) for t in s.labels] for s in items],
        }
        ds = datasets.Dataset.from_dict(data, features=features)
        ds.save_to_disk(str(out / split))
        ds.to_parquet(str(out / f"{split}.parquet"))
        rows = [{"words": list(s.words), "tags": list(s.labels)} for s in items]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": out, "sentences": sentences, "names": names}


@pytest.fixture(scope="module")
def sst(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An SST-2 slice: train.csv, dev.jsonl, test.parquet with string labels; a save_to_disk folder
    of train with ClassLabel ids; a TSV of train."""
    out = tmp_path_factory.mktemp("sst")
    examples = read_glue("sst2", data_root / "glue" / "SST-2" / "train.tsv", repairs=[])[:160]
    rows = [
        {"sentence": e.text_a.strip(), "label": "positive" if e.label == "1" else "negative"}
        for e in examples
    ]
    pd.DataFrame(rows[:96]).to_csv(out / "train.csv", index=False)
    pd.DataFrame(rows[:96]).to_csv(out / "train.tsv", index=False, sep="\t")
    pd.DataFrame(rows[96:128]).to_json(out / "dev.jsonl", orient="records", lines=True)
    pd.DataFrame(rows[128:]).to_parquet(out / "test.parquet")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    ids = {"sentence": [r["sentence"] for r in rows[:96]], "label": [r["label"] for r in rows[:96]]}
    datasets.Dataset.from_dict(ids, features=features).save_to_disk(str(out / "train_disk"))
    return {"dir": out, "rows": rows}


def _sentences_cfg(d: Path, **extra) -> dict:
    files = {"train": str(d / "train.csv"), "dev": str(d / "dev.jsonl"), "test": str(d / "test.parquet")}
    return {"name": "sst_slice", "reader": "table_sentences", "kind": "classification", "files": files,
            "text_column": "sentence", "label_column": "label", **extra}  # fmt: skip


def _tokens_cfg(d: Path, suffix: str = "", **extra) -> dict:
    files = {s: str(d / f"{s}{suffix}") for s in ("train", "dev", "test")}
    return {"name": "ewt_slice", "reader": "table_tokens", "files": files, "tokens_column": "tokens",
            "tags_column": "xpos", **extra}  # fmt: skip


# ------------------------------------------------------------------------------------------ readers
def test_every_format_reads_the_same_sentences(sst: dict) -> None:
    d, rows = sst["dir"], sst["rows"]
    task = load_task(_sentences_cfg(d))
    assert task.kind == "classification" and task.labels == ["negative", "positive"]
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [96, 32, 32]
    for split, (lo, hi) in {"train": (0, 96), "dev": (96, 128), "test": (128, 160)}.items():
        assert [(e.text_a, e.label) for e in task.splits[split]] == [
            (r["sentence"], r["label"]) for r in rows[lo:hi]
        ]
    assert task.splits["dev"][2].source == f"{d / 'dev.jsonl'}: row 3"
    assert task.files == [d / "train.csv", d / "dev.jsonl", d / "test.parquet"]
    # a save_to_disk folder with ClassLabel ids and a TSV give the same train examples
    for train in ("train_disk", "train.tsv"):
        cfg = _sentences_cfg(d)
        cfg["files"]["train"] = str(d / train)
        other = load_task(cfg)
        assert [(e.text_a, e.label) for e in other.splits["train"]] == [
            (e.text_a, e.label) for e in task.splits["train"]
        ]
    # split_train carves a seeded dev off train, as for GLUE
    carved = load_task(
        _sentences_cfg(d, protocol="split_train", files={**_sentences_cfg(d)["files"], "dev": None})
    )
    assert len(carved.splits["dev"]) == 10 and len(carved.splits["train"]) == 86
    texts = {e.text_a for e in carved.splits["train"]}
    assert not texts & {e.text_a for e in carved.splits["dev"]}


def test_token_formats_agree_and_classlabel_ids_become_names(ewt: dict) -> None:
    d, sentences = ewt["dir"], ewt["sentences"]
    disk = load_task(_tokens_cfg(d))
    parquet = load_task(_tokens_cfg(d, ".parquet"))
    jsonl = load_task(_tokens_cfg(d, ".jsonl", tokens_column="words", tags_column="tags"))
    for task in (disk, parquet, jsonl):
        assert task.kind == "labelling"
        for split, items in sentences.items():
            got = task.splits[split]
            assert [(s.words, s.labels) for s in got] == [(s.words, s.labels) for s in items]
    # a ClassLabel column declares the classes: all its names, also those absent from this train slice
    assert disk.labels == parquet.labels == ewt["names"] and len(disk.labels) == 49
    assert jsonl.labels == sorted({t for s in sentences["train"] for t in s.labels}) != disk.labels
    # control tasks (Hewitt & Liang) relabel word types of a table task as of a column task
    control = load_task(_tokens_cfg(d, control=True)).control_labels("dev", seed=0)
    assert len(control) == sum(len(s) for s in sentences["dev"]) and control.max() < len(disk.labels)
    # integer tags without ClassLabel names stay integers
    plain = d / "plain.jsonl"
    plain.write_text('{"tokens": ["a", "b"], "tags": [3, 1]}\n{"tokens": ["c"], "tags": [3]}\n')
    task = load_task(
        {"name": "ints", "reader": "table_tokens", "files": {"train": str(plain), "dev": str(plain)}}
    )
    assert task.splits["train"][0].labels == ("3", "1") and task.labels == ["1", "3"]


def test_offline_hf_cache_by_name_and_one_error_when_absent(ewt: dict, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    files = {s: str(ewt["dir"] / f"{s}.parquet") for s in ("train", "dev")}
    built = datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache))
    config = Path(built["train"].cache_files[0]["filename"]).parents[2].name
    cfg = {"name": "cached", "reader": "table_tokens", "hf_name": "parquet", "hf_config": config,
           "hf_cache_dir": str(cache), "files": {"train": "train", "dev": "dev"}, "tags_column": "xpos"}  # fmt: skip
    task = load_task(cfg)
    assert [s.labels for s in task.splits["dev"]] == [s.labels for s in ewt["sentences"]["dev"]]
    assert all(str(f).startswith(str(cache)) for f in task.files)
    with pytest.raises(LexpInputError, match=r"no split 'test'.*splits: \['dev', 'train'\]"):
        load_task({**cfg, "files": {"train": "train", "dev": "test"}})
    with pytest.raises(LexpInputError) as err:
        load_task({**cfg, "hf_name": "conll2003", "hf_config": None})
    message = str(err.value)
    assert "conll2003" in message and str(cache) in message and "never downloads" in message


def test_store_and_label_keys_follow_the_data_and_the_column_choice(sst: dict, tmp_path: Path) -> None:
    """Stores are keyed by the split's texts (sentences_digest), labels by their content
    (label_fingerprint): a column that picks other texts, or an edited label, gives a new key;
    the same texts under another column name share the store."""
    d = tmp_path / "copy"
    d.mkdir()
    for name in ("train.csv", "dev.jsonl", "test.parquet"):
        (d / name).write_bytes((sst["dir"] / name).read_bytes())
    cfg = _sentences_cfg(d)

    def keys(c: dict, split: str = "dev") -> tuple[str, str]:
        task = load_task(c)
        labels, _ = task.encode_labels(split)
        texts = sentences_digest((e.text_a, e.text_b) for e in task.splits[split])
        return texts, label_fingerprint(task.name, labels, task.labels)

    base = keys(cfg)
    assert keys(cfg) == base
    both = d / "both.csv"
    frame = pd.read_csv(d / "train.csv")
    frame.assign(copy=frame["sentence"], other=frame["sentence"].str.upper()).to_csv(both, index=False)
    one = {**cfg, "files": {"train": str(both), "dev": str(both)}}
    assert keys({**one, "text_column": "copy"})[0] == keys(one)[0]  # same texts: one store
    assert keys({**one, "text_column": "other"})[0] != keys(one)[0]  # other texts: another store
    text = (d / "dev.jsonl").read_text()
    (d / "dev.jsonl").write_text(text.replace("negative", "positive", 1))
    edited = keys(cfg)
    assert edited[0] == base[0] and edited[1] != base[1]  # same texts, changed labels: a new label entry


# ----------------------------------------------------------------------------------------- bad input
def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _one_error(cfg: dict, *patterns: str) -> str:
    with pytest.raises(LexpInputError) as err:
        load_task(cfg)
    message = str(err.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def _sent(tmp: Path, train: str, dev: str | None = None, **extra) -> dict:
    t = _csv(tmp / "t.csv", train)
    v = _csv(tmp / "v.csv", dev) if dev is not None else t
    return {"name": "bad", "reader": "table_sentences", "files": {"train": t, "dev": v}, **extra}


def _tok(tmp: Path, lines: list[dict], **extra) -> dict:
    path = tmp / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"name": "bad", "reader": "table_tokens", "files": {"train": str(path), "dev": str(path)}, **extra}


def test_missing_column_names_file_columns_and_fix(tmp_path: Path) -> None:
    cfg = _sent(tmp_path, "sentence,label\na,x\n")
    _one_error(cfg, "t.csv has no column 'text'", "['sentence', 'label']", "task.text_column=")
    cfg = _tok(tmp_path, [{"tokens": ["a"], "ner_tags": ["O"]}])
    _one_error(cfg, "no column 'tags'", "task.tags_column=")


def test_wrong_column_types(tmp_path: Path) -> None:
    _one_error(_sent(tmp_path, "text,label\n1,x\n2,y\n"), "holds int64 values, not text")
    _one_error(_sent(tmp_path, "text,label\na,0.5\nb,1.5\n"), "floating-point labels", "task.kind=regression")
    _one_error(
        _sent(tmp_path, "text,label\na,x\nb,y\n", kind="regression"), "not numbers", "kind=classification"
    )
    _one_error(_tok(tmp_path, [{"tokens": "a b", "tags": ["O", "O"]}]), "not lists", "task.tokens_column")
    _one_error(_tok(tmp_path, [{"tokens": [1, 2], "tags": ["O", "O"]}]), "not words")
    ok = load_task(_sent(tmp_path, "text,label\na,0.5\nb,1.5\n", kind="regression"))
    assert [e.label for e in ok.splits["train"]] == [0.5, 1.5] and ok.labels == []


def test_empty_split(tmp_path: Path) -> None:
    _one_error(_sent(tmp_path, "text,label\na,x\n", "text,label\n"), "v.csv has no rows (an empty split)")


def test_nulls_name_the_row(tmp_path: Path) -> None:
    lines = [{"text": "fine", "label": "x"}, {"text": None, "label": "y"}]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = {"name": "bad", "reader": "table_sentences", "files": {"train": str(tmp_path / "n.jsonl"), "dev": str(tmp_path / "n.jsonl")}}  # fmt: skip
    _one_error(cfg, "n.jsonl: row 2: column 'text' is empty (null)", "never drops")
    _one_error(_sent(tmp_path, "text,label\na,x\nb,\n"), "t.csv: row 2: column 'label' holds an empty label")
    _one_error(
        _tok(tmp_path, [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O", None]}]),
        "t.jsonl: row 2: word 2 has a null tag",
    )


def test_mismatched_token_and_tag_lengths(tmp_path: Path) -> None:
    lines = [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b", "c"], "tags": ["O", "O"]}]
    _one_error(_tok(tmp_path, lines), "t.jsonl: row 2: 3 words in 'tokens' but 2 tags in 'tags'")


def test_classlabel_id_outside_its_names(tmp_path: Path) -> None:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    ds = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "ok"))
    ds.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1}).cast(features).save_to_disk(
        str(tmp_path / "unlabelled")
    )
    cfg = {"name": "bad", "reader": "table_sentences", "files": {"train": str(tmp_path / "ok"), "dev": str(tmp_path / "unlabelled")}}  # fmt: skip
    _one_error(cfg, "unlabelled: row 1: label -1", "no label")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    cfg["files"]["dev"] = str(tmp_path / "dict")
    _one_error(cfg, "DatasetDict folder with splits ['train']", "dict/train")


def test_unseen_dev_labels_are_kept_and_counted_as_errors(tmp_path: Path) -> None:
    """The rule of every reader: a dev/test label unseen in train is scored as an error, not dropped."""
    task = load_task(_sent(tmp_path, "text,label\na,x\nb,y\n", "text,label\nc,x\nd,z\ne,z\n"))
    assert task.labels == ["x", "y"] and task.unseen_labels()["dev"] == {"z": 2}
    ids, unseen = task.encode_labels("dev")
    assert ids.tolist() == [0, 2, 2] and unseen == {"z": 2}


def test_too_long_for_the_model(tmp_path: Path, ewt: dict) -> None:
    from transformers import AutoTokenizer

    from lexp.encoders.loading import resolve_name_or_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_name_or_path("minilm"))
    long = " ".join(["word"] * 140)
    task = load_task(_sent(tmp_path, f"text,label\na,x\n{long},y\n"))
    with pytest.raises(
        LexpInputError, match=r"1 train examples .* 128 .*t\.csv: row 2 \(142 tokens\).*fix it"
    ):
        check_lengths(task, tokenizer, 128, fix="fix it")
    check_lengths(task, tokenizer, 142, fix="")  # exactly the limit is fine
    words = [{"tokens": ["ok"], "tags": ["O"]}, {"tokens": ["word"] * 600, "tags": ["O"] * 600}]
    task = load_task(_tok(tmp_path, words))
    with pytest.raises(LexpInputError, match=r"t\.jsonl: row 2 \(602 tokens\)"):
        check_lengths(task, tokenizer, 512, fix="")


def test_run_refuses_a_long_text_before_fine_tuning(sst: dict, tmp_path: Path) -> None:
    cfg = _cfg([f"cache_dir={tmp_path / 'cache'}", "task=custom_sentences", "task.text_column=sentence",
                f"task.files.train={sst['dir'] / 'train.csv'}", f"task.files.dev={sst['dir'] / 'dev.jsonl'}",
                "finetune.max_seq_length=16", *QUICK])  # fmt: skip
    check_config(cfg, device=False)
    with pytest.raises(LexpInputError, match=r"finetune\.max_seq_length \(now 16"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache" / "finetuned").exists()  # nothing was fine-tuned


# ------------------------------------------------------------------------------------------ end to end
def test_custom_sentences_end_to_end(sst: dict, tmp_path: Path) -> None:
    d = sst["dir"]
    overrides = [f"cache_dir={tmp_path / 'cache'}", "task=custom_sentences", "task.name=sst_slice",
                 "task.text_column=sentence", f"task.files.train={d / 'train.csv'}",
                 f"task.files.dev={d / 'dev.jsonl'}", f"task.files.test={d / 'test.parquet'}",
                 "finetune.epochs=1", "probe.epochs=20", "probe.lr=0.01", "probe.batch_size=16", *QUICK]  # fmt: skip
    cfg = _cfg(overrides)
    check_config(cfg, device=False)
    out = run(cfg, tmp_path / "run")
    assert out["status"] == "complete" and out["task_kind"] == "classification"
    assert out["rows"] == {"train": 96, "dev": 32, "test": 32} and out["labels"] == ["negative", "positive"]
    assert 0.5 <= out["oracle"]["dev"]["accuracy"] <= 1.0
    store = open_store(out["stores"]["test"])
    expected = [0 if r["label"] == "negative" else 1 for r in sst["rows"][128:]]
    assert store.labels.tolist() == expected


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokcache")


def test_custom_tokens_oracle_equals_task_pos(
    ewt: dict, data_root: Path, token_cache: Path, tmp_path: Path
) -> None:
    common = [f"cache_dir={token_cache}", f"data_root={data_root}", *QUICK]
    pos = run(
        _cfg([*common, "task=pos", f"limit.train={N_TRAIN}", f"limit.dev={N_DEV}", f"limit.test={N_TEST}"]),
        tmp_path / "pos",
    )
    d = ewt["dir"]
    custom_cfg = _cfg([*common, "task=custom_tokens", "task.name=ewt_slice", "task.tags_column=xpos",
                       *[f"task.files.{s}={d / s}" for s in ("train", "dev", "test")]])  # fmt: skip
    check_config(custom_cfg, device=False)
    custom = run(custom_cfg, tmp_path / "custom")
    assert custom["counts"] == pos["counts"] and custom["labels"] == pos["labels"]
    # the same EWT sentences: pos's stores, reused; its own label entries beside pos's
    assert custom["stores"] == pos["stores"] and all(custom["stores_reused"].values())
    assert not any(custom["labels_reused"].values()) and custom["store_labels"] != pos["store_labels"]
    for split in ("dev", "test"):
        assert custom["oracle"][split] == pos["oracle"][split]
    assert custom["oracle"]["dev"]["accuracy"] > 0.7


def test_custom_tokens_pipeline(ewt: dict, token_cache: Path, tmp_path: Path) -> None:
    d = ewt["dir"]
    cfg = _cfg([f"cache_dir={token_cache}", "task=custom_tokens", "task.name=ewt_slice", "task.tags_column=xpos",
                *[f"task.files.{s}={d / s}" for s in ("train", "dev", "test")], "analysis=pipeline",
                "analysis.grid.step=100", "analysis.batch=64", "analysis.timing.enabled=false", *QUICK])  # fmt: skip
    out = run(cfg, tmp_path)
    p = out["pipeline"]
    assert 0 <= p["ls_layer"] <= 6 and p["ccfs_n_neurons"] <= p["cc_n_neurons"] <= p["ls_n_neurons"]
    assert out["extractor"]["test_accuracy_reloaded"] == pytest.approx(
        out["extractor"]["test_accuracy_reported"]
    )

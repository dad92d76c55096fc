"""GLUE TSV readers and protocols: row counts from the data README, each file's quirk, the seeded
90/10 split, the pooled splits of tasks without a train file, caps, and malformed rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lexp.errors import LexpInputError
from lexp.tasks import load_task, read_glue, seeded_split

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


def task_cfg(yaml_name: str, data_root: Path, **overrides) -> dict:
    """A conf/task yaml composed with data_root and resolved, as lexp.run passes it."""
    cfg = OmegaConf.create({"data_root": str(data_root), "task": OmegaConf.load(CONF / f"{yaml_name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"task.{key}", value, merge=False)
    return OmegaConf.to_container(cfg.task, resolve=True)


# ------------------------------------------------------------------------------------ real files
@pytest.mark.parametrize(
    ("task", "file", "rows", "labels"),
    [
        ("sst2", "SST-2/train.tsv", 67349, {"0": 29780, "1": 37569}),
        ("sst2", "SST-2/dev.tsv", 872, {"0": 428, "1": 444}),
        ("mrpc", "MRPC/train.tsv", 3668, {"0": 1194, "1": 2474}),
        ("mrpc", "MRPC/dev.tsv", 408, {"0": 129, "1": 279}),
        ("mrpc", "MRPC/msr_paraphrase_test.txt", 1725, {"0": 578, "1": 1147}),
        ("rte", "RTE/train.tsv", 2490, {"entailment": 1249, "not_entailment": 1241}),
        ("rte", "RTE/dev.tsv", 277, {"entailment": 146, "not_entailment": 131}),
        ("qnli", "QNLI/dev.tsv", 5463, {"entailment": 2702, "not_entailment": 2761}),
        ("qqp", "QQP/labelled_subset.tsv", 23497, {"0": 14750, "1": 8747}),
        ("mnli", "MNLI/sample_matched.tsv", 1000, {"entailment": 373, "neutral": 311, "contradiction": 316}),
        (
            "mnli",
            "MNLI/sample_mismatched.tsv",
            1000,
            {"entailment": 346, "neutral": 319, "contradiction": 335},
        ),
    ],
)
def test_labelled_row_counts(data_root, task, file, rows, labels):
    examples = read_glue(task, data_root / "glue" / file, repairs=[])
    assert len(examples) == rows
    assert Counter(e.label for e in examples) == labels
    pair = task != "sst2"
    assert all((e.text_b is not None) == pair and e.text_a.strip() for e in examples)


@pytest.mark.parametrize(
    ("task", "file", "rows"),
    [("sst2", "SST-2/test.tsv", 1821), ("mrpc", "MRPC/test.tsv", 1725), ("qnli", "QNLI/test.tsv", 5463),
     ("stsb", "STS-B/test.tsv", 1379)],
)  # fmt: skip
def test_unlabelled_test_files(data_root, task, file, rows):
    path = data_root / "glue" / file
    examples = read_glue(task, path, require_labels=False)
    assert len(examples) == rows and all(e.label is None for e in examples)
    with pytest.raises(LexpInputError, match=rf"{path}:1: no label column"):
        read_glue(task, path)


def test_stsb_scores_are_floats_in_range(data_root):
    train = read_glue("stsb", data_root / "glue/STS-B/train.tsv")
    dev = read_glue("stsb", data_root / "glue/STS-B/dev.tsv")
    assert (len(train), len(dev)) == (5749, 1500)
    assert train[0].label == 5.0 and train[1].label == 3.8
    assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in train + dev)
    assert (train[0].text_a, train[0].text_b) == ("A plane is taking off.", "An air plane is taking off.")


def test_mrpc_bom_header_and_quotes_kept_verbatim(data_root):
    path = data_root / "glue/MRPC/dev.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality")
    first = read_glue("mrpc", path)[0]
    assert first.label == "1" and first.source == f"{path}:2"
    # QUOTE_NONE: the unbalanced quote is text, and the row does not swallow the next line
    assert first.text_b == '"The foodservice pie business does not fit our long-term growth strategy.'


def test_qqp_glued_label_is_repaired_and_reported(data_root):
    path = data_root / "glue/QQP/labelled_subset.tsv"
    repairs: list[str] = []
    examples = read_glue("qqp", path, repairs=repairs)
    assert len(repairs) == 1 and repairs[0].startswith(f"{path}:1: label '0' was glued to question2")
    first = examples[0]
    assert first.text_b == "Which level of prepration is enough for the exam jlpt5?" and first.label == "0"
    assert first.text_a == "How is the life of a math student? Could you describe your own experiences?"


def test_mnli_headerless_samples(data_root):
    first = read_glue("mnli", data_root / "glue/MNLI/sample_matched.tsv")[0]
    assert first.label == "entailment" and first.text_a.startswith("In Temple Bar , the bookshop")
    assert first.source.endswith("sample_matched.tsv:1")  # no header: the first line is data


# ------------------------------------------------------------------------------------- protocols
@pytest.mark.parametrize(
    ("name", "kind", "sizes", "n_official"),
    [
        ("sst2", "classification", (60614, 6735, 872), 67349),
        ("mrpc", "classification", (3301, 367, 408), 3668),
        ("rte", "classification", (2241, 249, 277), 2490),
        ("stsb", "regression", (5174, 575, 1500), 5749),
    ],
)
def test_split_train_protocol_is_deterministic_and_disjoint(data_root, name, kind, sizes, n_official):
    task = load_task(task_cfg(name, data_root))
    assert task.kind == kind
    assert tuple(len(task.splits[s]) for s in ("train", "dev", "test")) == sizes
    train_src = [e.source for e in task.splits["train"]]
    dev_src = [e.source for e in task.splits["dev"]]
    assert set(train_src).isdisjoint(dev_src) and len(set(train_src) | set(dev_src)) == n_official
    assert all(src.endswith(f"train.tsv:{src.rsplit(':', 1)[1]}") for src in train_src + dev_src)
    assert all("/dev.tsv:" in e.source for e in task.splits["test"])  # official dev = test, file order
    assert [e.source for e in task.splits["test"]][:2] == [f"{task.files[-1]}:2", f"{task.files[-1]}:3"]
    again = load_task(task_cfg(name, data_root))
    assert again.splits == task.splits
    other = load_task(task_cfg(name, data_root, split_seed=7))
    assert [e.source for e in other.splits["dev"]] != dev_src
    assert task.labels == (
        [] if kind == "regression" else sorted({str(e.label) for e in task.splits["train"]})
    )
    assert "split_seed=42" in task.notes["train"]["source"]


@pytest.mark.parametrize(
    ("name", "sizes", "labels"),
    [
        ("qnli", (4371, 546, 546), ["entailment", "not_entailment"]),
        ("qqp", (18797, 2350, 2350), ["0", "1"]),
        ("mnli", (1600, 200, 200), ["contradiction", "entailment", "neutral"]),
    ],
)
def test_pool_protocol_derives_all_splits(data_root, name, sizes, labels):
    task = load_task(task_cfg(name, data_root))
    assert tuple(len(task.splits[s]) for s in ("train", "dev", "test")) == sizes
    sources = [set(e.source for e in task.splits[s]) for s in ("train", "dev", "test")]
    assert sum(map(len, sources)) == sum(sizes) == len(set().union(*sources))  # disjoint, all rows used
    assert task.labels == labels
    assert "seeded permutation" in task.notes["test"]["source"]
    assert load_task(task_cfg(name, data_root)).splits == task.splits
    if name == "qqp":
        assert len(task.notes["repaired_rows"]) == 1
    if name == "mnli":
        assert {Path(p).name for p in task.files} == {"sample_matched.tsv", "sample_mismatched.tsv"}


def test_caps(data_root):
    full = load_task(task_cfg("sst2", data_root))
    capped = load_task(task_cfg("sst2", data_root, max_train_examples=500, max_test_examples=100))
    assert capped.splits["train"] == full.splits["train"][:500]
    assert capped.splits["test"] == full.splits["test"][:100]
    assert capped.splits["dev"] == full.splits["dev"]  # dev is never capped
    assert (
        capped.notes["train"]["examples_before_cap"] == 60614
        and "max_train_examples=500" in capped.notes["train"]["cap"]
    )
    assert "cap" not in load_task(task_cfg("sst2", data_root, max_test_examples=10**6)).notes["test"]


def test_seeded_split():
    a = seeded_split(10, [3, 2, 5], seed=42)
    assert [len(p) for p in a] == [3, 2, 5] and sorted(int(i) for p in a for i in p) == list(range(10))
    assert all((x == y).all() for x, y in zip(a, seeded_split(10, [3, 2, 5], seed=42), strict=True))
    with pytest.raises(ValueError):
        seeded_split(4, [3, 2, 0], seed=1)


def test_unseen_classification_labels_are_counted(tmp_path):
    (tmp_path / "train.tsv").write_text("entailment\ta\tb\nneutral\tc\td\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("neutral\ta\tb\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text(
        "contradiction\ta\tb\nentailment\tc\td\ncontradiction\te\tf\n", encoding="utf-8"
    )
    cfg = {
        "name": "toy_nli",
        "kind": "classification",
        "reader": "glue",
        "glue_task": "mnli",
        "protocol": "as_is",
        "data_dir": str(tmp_path),
        "files": {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
    }
    task = load_task(cfg)
    assert task.labels == ["entailment", "neutral"]
    ids, unseen = task.encode_labels("test")
    assert ids.tolist() == [2, 0, 2] and unseen == {"contradiction": 2}
    assert task.unseen_labels()["test"] == {"contradiction": 2} and task.unseen_labels()["dev"] == {}


# ------------------------------------------------------------------------------- malformed input
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_short_row_names_file_and_line(tmp_path):
    path = write(
        tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b entailment\n"
    )
    with pytest.raises(LexpInputError, match=rf"{path}:3: found 2 tab-separated fields, expected 4"):
        read_glue("rte", path)


def test_glued_label_outside_qqp_is_an_error(tmp_path):
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\ngood\t1\nbad 0\n")
    with pytest.raises(LexpInputError, match=rf"{path}:3: found 1 tab-separated fields, expected 2"):
        read_glue("sst2", path)


def test_qqp_glued_label_anywhere_is_repaired_with_its_line(tmp_path):
    path = write(tmp_path / "qqp.tsv", "1\t2\t3\tq1?\tq2?\t1\n4\t5\t6\tq3?\tq4? 1\n")
    repairs: list[str] = []
    examples = read_glue("qqp", path, repairs=repairs)
    assert [(e.text_b, e.label) for e in examples] == [("q2?", "1"), ("q4?", "1")]
    assert len(repairs) == 1 and repairs[0].startswith(f"{path}:2:")
    bad = write(tmp_path / "bad.tsv", "1\t2\t3\tq1?\tq2?\t1\n4\t5\t6\tq3?\tq4? maybe\n")
    with pytest.raises(LexpInputError, match=rf"{bad}:2: found 5 tab-separated fields, expected 6"):
        read_glue("qqp", bad)


def test_bad_labels_and_scores(tmp_path):
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\ngood\t1\nbad\tnegative\n")
    with pytest.raises(LexpInputError, match=rf"{path}:3: label 'negative' is not one of 0, 1"):
        read_glue("sst2", path)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = write(
        tmp_path / "sts.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t5.000\n1\tg\tf\ty\t1\tn\tn\ta\tb\t7.5\n"
    )
    with pytest.raises(LexpInputError, match=rf"{path}:3: score '7.5' is not a number in \[0, 5\]"):
        read_glue("stsb", path)


def test_empty_file_wrong_header_blank_line_and_empty_text(tmp_path):
    empty = write(tmp_path / "empty.tsv", "")
    with pytest.raises(LexpInputError, match=rf"{empty}:1: the file is empty"):
        read_glue("sst2", empty)
    wrong = write(tmp_path / "wrong.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(
        LexpInputError, match=rf"{wrong}:1: expected a sst2 header with the column 'sentence'"
    ):
        read_glue("sst2", wrong)
    blank = write(tmp_path / "blank.tsv", "sentence\tlabel\ngood\t1\n\nbad\t0\n")
    with pytest.raises(LexpInputError, match=rf"{blank}:3: blank line inside the file"):
        read_glue("sst2", blank)
    assert len(read_glue("sst2", write(tmp_path / "trailing.tsv", "sentence\tlabel\ngood\t1\n\n"))) == 1
    no_text = write(tmp_path / "no_text.tsv", "sentence\tlabel\ngood\t1\n \t0\n")
    with pytest.raises(LexpInputError, match=rf"{no_text}:3: the text 'sentence' is empty"):
        read_glue("sst2", no_text)


def test_glue_config_errors(data_root):
    with pytest.raises(
        LexpInputError, match=r"protocol 'split_train' does not read files.dev \(it carves dev from train"
    ):
        load_task(task_cfg("sst2", data_root, **{"files.dev": "dev.tsv"}))
    with pytest.raises(LexpInputError, match=r"GLUE stsb is a regression task; set kind: regression"):
        load_task(task_cfg("stsb", data_root, kind="classification"))
    with pytest.raises(LexpInputError, match=r"pool_fractions must sum to 1"):
        load_task(task_cfg("qqp", data_root, pool_fractions={"train": 0.8, "dev": 0.1, "test": 0.2}))
    with pytest.raises(LexpInputError, match=r"protocol must be one of"):
        load_task(task_cfg("rte", data_root, protocol="random"))

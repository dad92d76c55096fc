"""Column reader and labelling-task registry: real files (counts from the data README), the
paper's 150K-token cap, the carved chunking dev, unseen labels, and malformed input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lexp.errors import LexpInputError
from lexp.tasks import Sentence, TaskData, cap_tokens, load_task, read_columns

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"

EWT = {"word_column": 1, "label_column": 4, "separator": "\t", "min_columns": 10}
CONLL2000 = {"word_column": 0, "label_column": 2, "comment_prefix": None, "skip_token_ids": False}
PMB_SEM = {"word_column": 0, "label_column": 3, "separator": "\t", "min_columns": 7}


def n_tokens(sentences: list[Sentence]) -> int:
    return sum(len(s.words) for s in sentences)


def task_cfg(yaml_name: str, data_root: Path, **overrides) -> dict:
    """A conf/task yaml composed with data_root and resolved, as lexp.run passes it."""
    cfg = OmegaConf.create({"data_root": str(data_root), "task": OmegaConf.load(CONF / f"{yaml_name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"task.{key}", value)
    return OmegaConf.to_container(cfg.task, resolve=True)


# ------------------------------------------------------------------------------------ real files
@pytest.mark.parametrize(
    ("name", "sentences", "tokens", "n_labels"),
    [("train", 12544, 204577, 49), ("dev", 2001, 25147, 49), ("test", 2077, 25094, 48)],
)
def test_ewt_counts_match_data_readme(data_root, name, sentences, tokens, n_labels):
    data = read_columns(data_root / f"ud_english_ewt/en_ewt-ud-{name}.conllu", **EWT)
    assert (len(data), n_tokens(data)) == (sentences, tokens)
    assert len({label for s in data for label in s.labels}) == n_labels


def test_ewt_skips_multiword_ranges_and_empty_nodes_and_is_fast(data_root):
    path = data_root / "ud_english_ewt/en_ewt-ud-train.conllu"
    start = time.perf_counter()
    data = read_columns(path, **EWT)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"reading EWT train took {elapsed:.2f}s (measured 0.35s)"
    by_source = {s.source: s for s in data}
    dont = by_source[f"{path}:187"]  # line 205 is the range "19-20 don't", then "do" and "n't"
    assert dont.words[17:21] == ("I", "do", "n't", "find")
    assert dont.labels[17:21] == ("PRP", "VBP", "RB", "VB")
    assert "don't" not in dont.words
    iraqis = next(s for s in data if s.words[:3] == ("Over", "300", "Iraqis"))
    assert iraqis.words[:10] == (
        "Over",
        "300",
        "Iraqis",
        "are",
        "reported",
        "dead",
        "and",
        "500",
        "wounded",
        "in",
    )
    assert iraqis.words.count("reported") == 1  # the empty node 8.1 "reported" is skipped


def test_conll2000_counts_and_quirks(data_root):
    train = read_columns(data_root / "conll2000/train.txt", **CONLL2000)
    test = read_columns(data_root / "conll2000/test.txt", **CONLL2000)
    assert (len(train), n_tokens(train)) == (8936, 211727)
    assert (len(test), n_tokens(test)) == (2012, 47377)
    assert len({label for s in train for label in s.labels}) == 22
    # a sentence starts with the word "#" (pound sign): it is a token, not a comment
    pound = next(s for s in train if s.source.endswith("train.txt:202400"))
    assert (pound.words[0], pound.labels[0]) == ("#", "B-NP")
    # with "#" comments that line cannot be told from a comment: the reader refuses, naming it
    with pytest.raises(
        LexpInputError, match=r"train.txt:202400: this line starts with the comment prefix '#'"
    ):
        read_columns(data_root / "conll2000/train.txt", **{**CONLL2000, "comment_prefix": "#"})
    # words such as "1.8" or "10-2" in column 0 are never taken for CoNLL-U ids, even when asked to
    numeric = read_columns(data_root / "conll2000/train.txt", **{**CONLL2000, "skip_token_ids": True})
    assert n_tokens(numeric) == 211727
    assert (
        sum(w.replace(".", "").replace("-", "").isdigit() and w[0] != "-" for s in train for w in s.words)
        > 1000
    )


@pytest.mark.parametrize(
    ("name", "sentences", "tokens"),
    [("train", 7745, 50408), ("dev", 1174, 7368), ("test", 1053, 6821), ("eval", 841, 5710)],
)
def test_pmb_counts_one_sentence_per_raw_sent(data_root, name, sentences, tokens):
    path = data_root / f"pmb/4.0.0/en/{name}.conll"
    data = read_columns(path, **PMB_SEM)
    assert (len(data), n_tokens(data)) == (sentences, tokens)
    raw_sents = sum(line.startswith("# raw sent") for line in path.read_text(encoding="utf-8").splitlines())
    assert raw_sents == sentences  # several sentences of one document are still separate sentences


def test_pmb_tag_inventories_and_multisentence_document(data_root):
    path = data_root / "pmb/4.0.0/en/train.conll"
    sem = read_columns(path, **PMB_SEM)
    cat = read_columns(path, **{**PMB_SEM, "label_column": 4})
    assert len({label for s in sem for label in s.labels}) == 69
    assert len({label for s in cat for label in s.labels}) == 294
    # document p94/d3206 holds two sentences, separated by a blank line
    first = next(i for i, s in enumerate(sem) if s.source == f"{path}:82899")
    assert sem[first].words == ("I", "apologize", ".")
    assert sem[first + 1].words == ("It", "was", "my", "mistake", ".")
    assert cat[first].labels == ("np", "s:dcl\\np", ".")
    assert sum("~" in w for s in sem for w in s.words) > 1500  # multi-token expressions, one token each


# --------------------------------------------------------------------------------- task registry
def test_pos_task_caps_at_sentence_boundary(data_root):
    task = load_task(task_cfg("pos", data_root))
    full = read_columns(data_root / "ud_english_ewt/en_ewt-ud-train.conllu", **EWT)
    train = task.splits["train"]
    assert (len(train), n_tokens(train)) == (9288, 149978)
    assert train == full[: len(train)]  # the *first* sentences
    assert n_tokens(full[: len(train) + 1]) > 150000  # the next one would cross the cap: left out
    assert len(task.labels) == 49 and task.labels == sorted(task.labels)
    assert task.notes["train"]["tokens"] == 149978 and task.notes["train"]["tokens_read"] == 204577
    assert [p.name for p in task.files] == [f"en_ewt-ud-{s}.conllu" for s in ("train", "dev", "test")]
    assert task.unseen_labels() == {"train": {}, "dev": {}, "test": {}}


def test_cap_tokens_excludes_the_crossing_sentence():
    sentences = [Sentence(("w",) * n, ("L",) * n, f"f:{i}") for i, n in enumerate([4, 3, 5, 1])]
    assert [len(s) for s in cap_tokens(sentences, 7)] == [4, 3]  # 4+3 = 7 <= 7
    assert [len(s) for s in cap_tokens(sentences, 11)] == [4, 3]  # +5 = 12 > 11; the later 1 is not taken
    assert [len(s) for s in cap_tokens(sentences, 13)] == [4, 3, 5, 1]
    assert cap_tokens(sentences, 3) == []


def test_chunking_dev_is_carved_from_train_tail_before_the_cap(data_root):
    task = load_task(task_cfg("chunking", data_root))
    again = load_task(task_cfg("chunking", data_root))
    assert task.splits == again.splits  # deterministic
    train, dev = task.splits["train"], task.splits["dev"]
    full = read_columns(data_root / "conll2000/train.txt", **CONLL2000)
    assert dev == full[-1787:]  # round(0.2 * 8936): the last 20% of train sentences
    assert train == full[: len(train)] and len(train) + len(dev) < len(full)
    assert {s.source for s in train}.isdisjoint(s.source for s in dev)
    assert (len(train), n_tokens(train)) == (6380, 149999)  # cap applied to the remaining 7,149
    assert (len(task.splits["test"]), n_tokens(task.splits["test"])) == (2012, 47377)
    assert len(task.labels) == 22
    assert "carved_from_train" in task.notes["dev"] and task.notes["dev"]["sentences"] == 1787
    # labels of test that the (capped) train never saw are counted, not dropped
    ids, unseen = task.encode_labels("test")
    assert len(ids) == 47377 and sum(unseen.values()) == 2  # two test tokens carry a label absent from train
    assert unseen == task.unseen_labels()["test"]
    assert int((ids >= len(task.labels)).sum()) == sum(unseen.values())


@pytest.mark.parametrize(("name", "n_labels"), [("sem", 69), ("ccg", 294)])
def test_pmb_tasks_restore_multiword_spaces(data_root, name, n_labels):
    task = load_task(task_cfg(name, data_root))
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 7745, "dev": 1174, "test": 1053}
    assert n_tokens(task.splits["train"]) == 50408  # PMB train is under the 150K cap
    assert len(task.labels) == n_labels
    words = [w for s in task.splits["train"] for w in s.words]
    assert "New York" in words and not any("~" in w for w in words)
    assert "multiword_joiner" in task.notes


def test_custom_columns_template_with_overrides(data_root, tmp_path):
    cfg = task_cfg(
        "custom_columns",
        data_root,
        **{
            "name": "my_chunks",
            "files.train": str(data_root / "conll2000/train.txt"),
            "files.dev": None,
            "dev_from_train": 0.1,
            "files.test": str(data_root / "conll2000/test.txt"),
            "label_column": 2,
        },
    )
    task = load_task(cfg)
    assert task.name == "my_chunks"
    assert len(task.splits["dev"]) == 894 and n_tokens(task.splits["train"]) == 149999
    with pytest.raises(LexpInputError, match=r"files.train is not set"):
        load_task(task_cfg("custom_columns", data_root))


# ------------------------------------------------------------------------------- unseen labels
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_unseen_labels_get_new_ids_in_order_of_first_appearance(tmp_path):
    write(tmp_path / "train.txt", "a A\nb B\n\nc A\n")
    write(tmp_path / "dev.txt", "a C\nb A\nc D\n\nd C\ne B\n")
    write(tmp_path / "test.txt", "a D\n")
    cfg = {
        "name": "toy",
        "kind": "labelling",
        "reader": "columns",
        "data_dir": str(tmp_path),
        "files": {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},
        "word_column": 0,
        "label_column": 1,
        "comment_prefix": None,
    }
    task = load_task(cfg)
    assert task.labels == ["A", "B"]
    ids, unseen = task.encode_labels("dev")
    assert ids.dtype == np.int64 and ids.tolist() == [2, 0, 3, 2, 1]
    assert unseen == {"C": 2, "D": 1} and list(unseen) == ["C", "D"]
    ids, unseen = task.encode_labels("test")
    assert ids.tolist() == [2] and unseen == {"D": 1}  # per split: the first unseen label gets len(labels)
    assert task.encode_labels("train")[1] == {}
    assert task.unseen_labels() == {"train": {}, "dev": {"C": 2, "D": 1}, "test": {"D": 1}}


def test_regression_encodes_float32_scores():
    from lexp.tasks import Example

    task = TaskData(
        "toy",
        "regression",
        {"train": [Example("a", "b", 4.5, "f:1"), Example("c", None, 0.25, "f:2")]},
        [],
        [],
        {},
    )
    ids, unseen = task.encode_labels("train")
    assert ids.dtype == np.float32 and ids.tolist() == [4.5, 0.25] and unseen == {}


# ------------------------------------------------------------------------------- malformed input
def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.conll", "")
    with pytest.raises(LexpInputError, match=rf"{path}:1: the file is empty"):
        read_columns(path, word_column=0, label_column=1)
    blank = write(tmp_path / "blank.conll", "\n  \n\n")
    with pytest.raises(LexpInputError, match=rf"{blank}:1: the file is empty"):
        read_columns(blank, word_column=0, label_column=1)


def test_only_comments_means_no_sentences(tmp_path):
    path = write(tmp_path / "c.conll", "# a comment\n# another\n\n")
    with pytest.raises(LexpInputError, match=rf"{path}:1: no sentences found"):
        read_columns(path, word_column=0, label_column=1)


def test_label_column_missing_on_one_line(tmp_path):
    path = write(tmp_path / "chunks.txt", "He PRP B-NP\nreckons VBZ B-VP\n\nthe DT B-NP\ncurrent JJ\n")
    with pytest.raises(LexpInputError) as err:
        read_columns(path, word_column=0, label_column=2, comment_prefix=None)
    message = str(err.value)
    assert message.startswith(f"{path}:5: found 2 columns")
    assert "label_column=2 (column 3 counting from 1) is missing" in message


def test_word_column_missing(tmp_path):
    path = write(tmp_path / "x.tsv", "1\tw\tNN\n2\n")
    with pytest.raises(
        LexpInputError,
        match=r"x.tsv:2: found 1 column \(split on separator='\\t'\), so word_column=1 .* and label_column=2",
    ):
        read_columns(path, word_column=1, label_column=2, separator="\t")


def test_wrong_column_count_against_first_line_and_min_columns(tmp_path):
    path = write(tmp_path / "x.tsv", "a\tDT\tB-NP\n\nb\tNN\tI-NP\textra\n")
    with pytest.raises(
        LexpInputError, match=rf"{path}:3: found 4 columns, but the first token line \(1\) has 3"
    ):
        read_columns(path, word_column=0, label_column=2, separator="\t")
    with pytest.raises(
        LexpInputError,
        match=rf"{path}:1: found 3 columns \(split on separator='\\t'\), but this format needs at least 7",
    ):
        read_columns(path, word_column=0, label_column=2, separator="\t", min_columns=7)


def test_empty_word_or_label(tmp_path):
    path = write(tmp_path / "x.tsv", "a\tDT\nb\t \n")
    with pytest.raises(LexpInputError, match=rf"{path}:2: the label \(column 2\) is empty"):
        read_columns(path, word_column=0, label_column=1, separator="\t")
    path = write(tmp_path / "y.tsv", "a\tDT\n\n\tNN\n")
    with pytest.raises(LexpInputError, match=rf"{path}:3: the word \(column 1\) is empty"):
        read_columns(path, word_column=0, label_column=1, separator="\t")


def test_comment_inside_a_sentence_fails_loudly(tmp_path):
    path = write(tmp_path / "x.tsv", "# sent 1\na\tDT\n# sent 2\nb\tNN\n")
    with pytest.raises(LexpInputError, match=rf"{path}:3: .*comments are only allowed before a sentence"):
        read_columns(path, word_column=0, label_column=1, separator="\t")


CONLLU = (
    "# text = I don't know\n"
    "1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_\n"
    "2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_\n"
    "3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_\n"
    "3.1\tknow\tknow\tVERB\tVB\t_\t_\t_\t_\t_\n"
    "4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\t_\n"
    "\n"
)


def test_conllu_ranges_and_empty_nodes(tmp_path):
    path = write(tmp_path / "x.conllu", CONLLU)
    (sentence,) = read_columns(path, word_column=1, label_column=4, separator="\t")
    assert sentence.words == ("I", "do", "n't", "know") and sentence.labels == ("PRP", "VBP", "RB", "VB")
    assert sentence.source == f"{path}:2"
    (raw,) = read_columns(path, word_column=1, label_column=4, separator="\t", skip_token_ids=False)
    assert raw.words == ("I", "don't", "do", "n't", "know", "know")


def test_conllu_underscore_label_is_an_error(tmp_path):
    # DEPS (column 9) is filled on the first word and "_" on the second; the range line is skipped
    path = write(tmp_path / "x.conllu", CONLLU.replace("3\tnsubj\t_", "3\tnsubj\t3:nsubj"))
    with pytest.raises(LexpInputError, match=rf"{path}:4: the label \(column 9\) is '_'"):
        read_columns(path, word_column=1, label_column=8, separator="\t")


def test_ranges_are_words_when_column_0_is_not_an_id(tmp_path):
    # column 0 holds scores in a non-CoNLL-U file: "3-2" and "1.5" are data, not ids
    text = "3-2\twon\tVBD\nscore\t1.5\tCD\n\n1.5\tgoals\tNNS\n\n2\tx\tNN\n1-2\ty\tNN\n"
    path = write(tmp_path / "x.tsv", text)
    data = read_columns(path, word_column=1, label_column=2, separator="\t")
    assert [s.words for s in data] == [("won", "1.5"), ("goals",), ("x", "y")]


def test_tokens_with_spaces_stay_one_word_with_a_separator(tmp_path):
    path = write(tmp_path / "x.tsv", "New York\tNNP\ncity\tNN\n")
    (sentence,) = read_columns(path, word_column=0, label_column=1, separator="\t")
    assert sentence.words == ("New York", "city")


def test_config_errors(tmp_path, data_root):
    with pytest.raises(LexpInputError, match=r"unknown config key\(s\) \['label_colum'\]"):
        load_task({**task_cfg("pos", data_root), "label_colum": 3})
    with pytest.raises(LexpInputError, match=r"no dev split"):
        load_task(task_cfg("chunking", data_root, dev_from_train=None))
    with pytest.raises(LexpInputError, match=r"both files.dev and dev_from_train"):
        load_task(task_cfg("pos", data_root, dev_from_train=0.1))
    with pytest.raises(LexpInputError, match=r"files.train = .*nowhere.* does not exist"):
        load_task(task_cfg("pos", tmp_path / "nowhere"))
    with pytest.raises(LexpInputError, match=r"unresolved interpolation"):
        load_task(OmegaConf.to_container(OmegaConf.load(CONF / "pos.yaml")))

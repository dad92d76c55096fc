"""Issue 12, tried as a hostile-but-fair user: every bad setting is one clear error before any work,
the README's custom-data commands run as written, tab-separated and commented files read right, PMB
layouts are recognised, and lexp.predict never tracebacks. Each test failed on the code before.

Cases (issue 12 numbering): 3 settings checked late, 4 the README's TSV separator, 5 predict, 7 a
token line that is only a tab, 8 comment prefixes through a shell and a copy-pasteable command,
9 PMB column layouts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lexp.errors import LexpInputError
from lexp.experiment import config_dir
from lexp.schema import check_config, command_line
from lexp.tasks import load_task, read_columns

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ------------------------------------------------------------------ 3: settings checked before work
BAD = [
    (["probe.epochs=abc"], "probe.epochs='abc'", "an integer >= 1", "probe.epochs=10"),
    (["probe.lr=-1"], "probe.lr=-1", "a number > 0", "probe.lr=0.001"),
    (["probe.lr=0"], "probe.lr=0", "a number > 0", "probe.lr=0.001"),
    (["probe.read_steps=abc"], "probe.read_steps='abc'", "an integer in [1, 65536]", "probe.read_steps=16"),
    (["analysis=general", "analysis.ct=1.5"], "analysis.ct=1.5", "in [0, 1]", "analysis.ct=0.3"),
    (["analysis=pipeline", "analysis.delta=2"], "analysis.delta=2", "in [0, 1)", "analysis.delta=0.01"),
    (["limit.dev=-1"], "limit.dev=-1", "an integer >= 1 or null", "limit.dev=null"),
    (["limit.train=0"], "limit.train=0", "an integer >= 1 or null", "limit.train=null"),
    (["analysis=neurons", "analysis.target_fraction=0"], "analysis.target_fraction=0", "in (0, 1]", "=0.97"),
    (["store.dtype=int8"], "store.dtype='int8'", "one of float16|float32", "store.dtype=float16"),
    (["extract.subword=middle"], "extract.subword='middle'", "one of last|first|average", "extract.subword="),
    (["model.dtype=half"], "model.dtype='half'", "float32|bfloat16|float16", "model.dtype=float32"),
    (["seed=1.5"], "seed=1.5", "an integer", "seed=42"),
    (["threads.probes=0"], "threads.probes=0", "an integer in [1, ", "threads.probes="),
    (["device=tpu"], "device='tpu'", "auto, cpu, cuda or cuda:N", "device="),
]


@pytest.mark.parametrize(("overrides", "value", "allowed", "fix"), BAD, ids=[b[1] for b in BAD])
def test_bad_setting_is_one_error_before_any_work(overrides, value, allowed, fix, tmp_path: Path) -> None:
    """The message names key=value, the allowed range and a fix; run() stops before any store."""
    from lexp.experiment import run

    cache = tmp_path / "cache"
    small = [] if any(o.startswith("limit.") for o in overrides) else ["limit.train=20", "limit.dev=10"]
    cfg = _cfg([*overrides, *small, f"cache_dir={cache}", "logger=none"])
    with pytest.raises(LexpInputError) as err:
        check_config(cfg)
    message = str(err.value)
    assert message.startswith(value) and allowed in message and "Fix:" in message and fix in message, message
    assert "\n" not in message
    start = time.perf_counter()
    with pytest.raises(LexpInputError, match=re.escape(value)):
        run(cfg, tmp_path / "run")
    assert time.perf_counter() - start < 5.0
    assert not cache.exists() and not (tmp_path / "run" / "results.json").exists()


def test_good_configs_pass_and_named_values_become_canonical() -> None:
    for overrides in (
        [],
        ["task=ccg"],
        ["task=sst2"],
        ["task=qnli"],
        ["analysis=pipeline"],
        ["analysis=neurons"],
        ["analysis=general", "analysis.ct=[0.0,0.5,1.0]"],
        ["analysis=layers"],
    ):
        check_config(_cfg(overrides))
    for spelling in ("tab", r"\t", r"\\t", "'\\t'"):
        cfg = _cfg([f"task.separator={spelling}", "task.comment_prefix=hash"])
        check_config(cfg)
        assert (cfg.task.separator, cfg.task.comment_prefix) == ("\t", "#"), spelling
    cfg = _cfg(["task.separator=whitespace"])
    check_config(cfg)
    assert cfg.task.separator is None


def test_schema_knows_every_key_in_conf() -> None:
    """A key added to conf/ must be added to lexp.schema (one line) so that it is checked too."""
    from lexp.schema import _OPEN_GROUPS, _flatten, known_keys

    groups = {p.name: [q.stem for q in p.glob("*.yaml")] for p in (REPO / "conf").iterdir() if p.is_dir()}
    unknown = set()
    from omegaconf import OmegaConf

    for group in ("task", "analysis", "model", "logger", "trainer"):
        for option in groups[group]:
            cfg = _cfg([f"{group}={option}"])
            plain = OmegaConf.to_container(cfg, resolve=False)
            rules = known_keys(plain)
            unknown |= {
                k for k in _flatten(plain, leaves=rules) if k not in rules and not k.startswith(_OPEN_GROUPS)
            }
    assert not unknown, f"add these keys to lexp/schema.py: {sorted(unknown)}"


@pytest.mark.parametrize(
    "overrides",
    [["probe.epochs=abc"], ["analysis=pipeline", "analysis.delta=2"], ["device=cuda"]],
    ids=["epochs", "delta", "device"],
)
def test_cli_fails_within_5s_and_creates_no_store(overrides, tmp_path: Path, data_root: Path) -> None:
    if "device=cuda" in overrides:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: device=cuda is valid here")
    env = {**ENV, "LEXP_DATA": str(data_root), "LEXP_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.run",
            "task=pos",
            *overrides,
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lexp: error: ") and "Traceback" not in done.stderr, (
        done.stderr
    )
    assert seconds < 5.0, f"{seconds:.1f} s to the error"
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------- 4: separators and the column error
def test_separator_named_values_and_escapes_mean_a_tab(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("New York\tNNP\ncity\tNN\n", encoding="utf-8")
    for spelling in ("tab", "\\t", "\\\\t", "\t"):
        (sentence,) = read_columns(path, word_column=0, label_column=1, separator=spelling)
        assert sentence.words == ("New York", "city"), spelling
    with pytest.raises(LexpInputError, match=r"found 1 column \(split on separator='\|'\)"):
        read_columns(path, word_column=0, label_column=1, separator="|")
    with pytest.raises(LexpInputError, match=r"task.separator='t' .*unquoted \\t .*task.separator=tab"):
        read_columns(path, word_column=0, label_column=1, separator="t")


def test_what_the_shell_and_hydra_deliver_for_backslash_t() -> None:
    """`task.separator='\\t'` in bash reaches Hydra as backslash + t; lexp reads it as a tab."""
    words = subprocess.run(
        ["bash", "-c", "printf '%s\\0' task.separator='\\t' \"task.separator='\\t'\" task.separator=tab"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")[:-1]
    assert words == ["task.separator=\\t", "task.separator='\\t'", "task.separator=tab"]
    for word in words:
        cfg = _cfg([word])
        check_config(cfg, device=False)
        assert cfg.task.separator == "\t", word


# ------------------------------------------------------------------------ 7: a token line of a tab
@pytest.mark.parametrize("blank", ["\t", " ", "\t\t", " \t "])
def test_whitespace_only_line_is_an_error_not_a_sentence_break(blank: str, tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text(f"a\tDT\n{blank}\nb\tNN\n\nc\tNN\r\n\r\nd\tNN\n", encoding="utf-8")
    with pytest.raises(LexpInputError, match=rf"{re.escape(str(path))}:2: the line holds only whitespace"):
        read_columns(path, word_column=0, label_column=1, separator="\t")
    path.write_text("a\tDT\nb\tNN\r\n\r\nc\tNN\n", encoding="utf-8")  # CRLF blank lines still end sentences
    assert [s.words for s in read_columns(path, word_column=0, label_column=1, separator="\t")] == [
        ("a", "b"),
        ("c",),
    ]


# ------------------------------------------------------- 8: comment prefixes, '#' tokens, the command
PTB_LIKE = "#\t#\n12\tCD\nmillion\tCD\n.\t.\n\nThe\tDT\ncat\tNN\ncosts\tVBZ\n#\t#\n5\tCD\n.\t.\n"


def test_a_comment_that_looks_like_a_token_line_stops_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "ptb.conll"
    path.write_text(PTB_LIKE, encoding="utf-8")
    with pytest.raises(
        LexpInputError,
        match=r"ptb.conll:1: this line starts with the comment prefix '#' .*comment_prefix=null",
    ):
        read_columns(path, word_column=0, label_column=1, separator="\t", comment_prefix="#")
    sentences = read_columns(path, word_column=0, label_column=1, separator="tab", comment_prefix=None)
    assert [s.words[0] for s in sentences] == ["#", "The"] and sum(len(s.words) for s in sentences) == 10
    conllu = tmp_path / "x.conllu"  # real comments (one field, or with spaces) are still comments
    conllu.write_text(
        "# sent_id = 1\n# text = # 5\n1\t#\t#\tSYM\t#\t_\t0\troot\t_\t_\n2\t5\t5\tNUM\tCD\t_\t1\tnummod\t_\t_\n"
    )
    (s,) = read_columns(conllu, word_column=1, label_column=4, separator="\t", comment_prefix="hash")
    assert s.words == ("#", "5")


def test_hydra_lexer_error_is_one_line_with_the_quoting_that_works(tmp_path: Path) -> None:
    from lexp.run import override_problem

    shell = subprocess.run(
        ["bash", "-c", "printf '%s\\0' task.comment_prefix='#'"], capture_output=True, text=True
    )
    (word,) = shell.stdout.split("\0")[:-1]
    assert word == "task.comment_prefix=#"
    problem = override_problem([word])
    assert problem is not None and problem.startswith("lexp: error: ") and "\n" not in problem
    assert "\"task.comment_prefix='#'\"" in problem and "task.comment_prefix=hash" in problem
    assert (
        override_problem(["task.comment_prefix='#'", "task.comment_prefix=hash", "-m", "probe.lr=1e-3"])
        is None
    )
    for spelling in ("task.comment_prefix='#'", "task.comment_prefix=hash"):
        cfg = _cfg([spelling])
        check_config(cfg, device=False)
        assert cfg.task.comment_prefix == "#"


def test_recorded_command_is_copy_pasteable() -> None:
    argv = [
        str(REPO / "src" / "lexp" / "run.py"),
        "task.comment_prefix=#",
        "task.separator=\t",
        "task.name=my task",
    ]
    line = command_line(argv)
    assert line.startswith("python -m lexp.run ")
    assert shlex.split(line)[3:] == argv[1:]
    assert command_line(["lexp", "task=pos"]) == "lexp task=pos"


def test_custom_columns_template_and_readme_agree_on_comments() -> None:
    """The PTB has '#' tokens: the template keeps comments off, and the README's PTB command too."""
    from omegaconf import OmegaConf

    template = OmegaConf.load(REPO / "conf" / "task" / "custom_columns.yaml")
    assert template.comment_prefix is None
    for command in readme_custom_commands():
        if "/data/ptb/" in command:
            assert "comment_prefix" not in command, command


# --------------------------------------------------------- the README's custom-data commands, as written
def readme_custom_commands(readme: Path | None = None) -> list[str]:
    """Every command of the README's custom-data section (between the "Your own CoNLL-style files"
    paragraph and the next heading), continuation lines joined, comments dropped."""
    readme = readme or Path(os.environ.get("LEXP_TEST_README", REPO / "README.md"))
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "Your own CoNLL-style files" in line)
    blocks: list[list[str]] = []
    fenced = False
    for line in lines[start:]:
        if line.startswith("```"):
            fenced = not fenced
            if fenced:
                blocks.append([])
        elif fenced:
            blocks[-1].append(line)
        elif line.startswith("#"):  # the next heading ends the section
            break
    commands = []
    for block in blocks:
        for command in re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def _write_ptb_like(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        files[split] = folder / f"{split}.conll"
        files[split].write_text("\n".join([PTB_LIKE] * n), encoding="utf-8")
    return files


def _write_conllu(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sentence = (
        "# sent_id = {i}\n# text = The cat's # 5.\n"
        "1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_\n"
        "2-3\tcat's\t_\t_\t_\t_\t_\t_\t_\t_\n"
        "2\tcat\tcat\tNOUN\tNN\t_\t0\troot\t_\t_\n"
        "3\t's\t's\tPART\tPOS\t_\t2\tcase\t_\t_\n"
        "4\t#\t#\tSYM\t#\t_\t2\tdep\t_\t_\n"
        "5\t5\t5\tNUM\tCD\t_\t4\tnummod\t_\t_\n"
        "6\t.\t.\tPUNCT\t.\t_\t2\tpunct\t_\t_\n\n"
    )
    files = {}
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        files[split] = folder / f"{split}.conllu"
        files[split].write_text("".join(sentence.format(i=i) for i in range(n)), encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_model, tiny_bert

    tmp = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_bert(tmp, layers=1)
    return save_model(model, tokenizer, tmp / "model")


def test_readme_custom_data_commands_run_as_written(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    """Each command goes through bash (its quoting as written), then lexp.run's config and run()."""
    from lexp.experiment import run

    commands = readme_custom_commands()
    assert commands, "the README's custom-data section has no command"
    data = {"ptb": _write_ptb_like(tmp_path / "ptb"), "ud": _write_conllu(tmp_path / "ud")}
    for i, command in enumerate(commands):
        head = "python -m lexp.run "
        assert command.startswith(head), command
        for corpus, files in data.items():
            for split, path in files.items():
                command = re.sub(rf"/data/{corpus}/{split}\.conllu?\b", str(path), command)
        assert "/data/" not in command, f"no small stand-in for a path in: {command}"
        words = subprocess.run(
            ["bash", "-c", f"set -- {command[len(head) :]}; printf '%s\\0' \"$@\""],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")[:-1]
        from lexp.run import override_problem

        assert override_problem(words) is None, override_problem(words)
        fast = [
            f"model.name_or_path={tiny_model_dir}",
            "model.name=tiny",
            f"cache_dir={tmp_path / 'cache'}",
            "logger=none",
            "progress=false",
            "probe.epochs=1",
            "device=cpu",
        ]
        cfg = _cfg([*words, *fast])
        monkeypatch.setattr(sys, "argv", [str(REPO / "src" / "lexp" / "run.py"), *words])
        results = run(cfg, tmp_path / f"run{i}")
        assert results["status"] == "complete"
        tokens = results["counts"]["train"]["tokens"]
        expected = 60 if "/ptb/" in command else 36  # every '#' token kept, CoNLL-U ranges skipped
        assert tokens == expected, (command, results["counts"])
        assert shlex.split(results["command"])[3:] == words
        assert (
            json.loads((tmp_path / f"run{i}" / "results.json").read_text())["command"] == results["command"]
        )


# ------------------------------------------------------------------------------- 9: PMB layouts
def _pmb(data_root: Path, folder: Path, keep: list[int] | None, n: int = 120) -> Path:
    """The first ``n`` sentences of each PMB 4.0.0 split, with only the columns ``keep`` (and the
    header comment likewise cut): ``[0, 2, 3, 4, 5, 6]`` is the PMB 3.0.0 layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        out, count = [], 0
        for line in (data_root / "pmb/4.0.0/en" / f"{split}.conll").read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                count += 1
                if count >= n:
                    break
            elif keep is not None and (not line.startswith("#") or line.startswith("# tok:")):
                fields = line.split("\t")
                line = "\t".join(fields[i] for i in keep)
                if line.startswith("tok:"):
                    line = "# " + line
            out.append(line)
        (folder / f"{split}.conll").write_text("\n".join(out) + "\n", encoding="utf-8")
    return folder


def _pmb_task(name: str, folder: Path, **overrides) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"data_root": "/unused", "task": OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml")}
    )
    OmegaConf.update(cfg, "task.data_dir", str(folder))
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"task.{key}", value)
    return OmegaConf.to_container(cfg.task, resolve=True)


@pytest.mark.parametrize("name", ["sem", "ccg"])
def test_pmb_3_and_4_layouts_give_the_same_labels(name: str, data_root: Path, tmp_path: Path) -> None:
    v4 = load_task(_pmb_task(name, _pmb(data_root, tmp_path / "v4", None)))
    v3_header = load_task(_pmb_task(name, _pmb(data_root, tmp_path / "v3", [0, 2, 3, 4, 5, 6])))
    for split in ("train", "dev", "test"):
        assert [s.labels for s in v3_header.splits[split]] == [s.labels for s in v4.splits[split]]
    assert "PMB 3.0.0" in v3_header.notes["pmb_layout"] and "PMB 4.0.0" in v4.notes["pmb_layout"]
    # without the header comment, the column count alone tells 3.0.0 (6) from 4.0.0 (7)
    for path in (tmp_path / "v3").glob("*.conll"):
        path.write_text(
            "".join(ln for ln in path.read_text().splitlines(True) if not ln.startswith("# tok:"))
        )
    v3_count = load_task(_pmb_task(name, tmp_path / "v3"))
    assert v3_count.labels == v4.labels and "no column header" in v3_count.notes["pmb_layout"]


def test_pmb_wrong_column_is_refused(data_root: Path, tmp_path: Path) -> None:
    v4 = _pmb(data_root, tmp_path / "v4", None)
    with pytest.raises(
        LexpInputError, match=r"label_column=4 does not match the sem layer .*task.label_column=null"
    ):
        load_task(_pmb_task("sem", v4, label_column=4))  # sem pointed at the CCG column
    v3 = _pmb(data_root, tmp_path / "v3", [0, 2, 3, 4, 5, 6])
    # the path: following the old "set task.min_columns" hint with sem's 4.0.0 column
    with pytest.raises(
        LexpInputError, match=r"label_column=3 does not match the sem layer .* label_column is 2"
    ):
        load_task(_pmb_task("sem", v3, label_column=3, min_columns=6))
    with pytest.raises(
        LexpInputError, match=r"label_column=4 does not match the cat layer .* label_column is 3"
    ):
        load_task(_pmb_task("ccg", v3, label_column=4))  # ccg's 4.0.0 column is 3.0.0's senses
    # no header, an unknown layout: the vocabulary check still refuses a wrong column ...
    odd = _pmb(data_root, tmp_path / "odd", [0, 2, 4, 3, 5])  # tok sym cat sem sns, no header
    for path in odd.glob("*.conll"):
        path.write_text(
            "".join(ln for ln in path.read_text().splitlines(True) if not ln.startswith("# tok:"))
        )
    with pytest.raises(LexpInputError) as err:
        load_task(_pmb_task("sem", odd))
    message = str(err.value)
    for setting in ("task.word_column", "task.label_column", "task.min_columns=5"):
        assert setting in message, message  # ... and the hint names every setting that changes
    with pytest.raises(LexpInputError, match=r"column 2 of .* does not hold the PMB sem layer"):
        load_task(_pmb_task("sem", odd, label_column=2, min_columns=5))
    assert (
        load_task(_pmb_task("sem", odd, label_column=3, min_columns=5)).labels
        == load_task(_pmb_task("sem", v4)).labels
    )


# ------------------------------------------------------------------------------------- 5: predict
def test_predict_failures_are_one_clear_line(tmp_path: Path, capsys) -> None:
    from test_extractor import predict_cli, save_tiny_extractor

    path, _ = save_tiny_extractor(tmp_path)
    capsys.readouterr()  # transformers' save progress bar
    good = tmp_path / "in.txt"
    good.write_text("The quick fox\nA cat\n", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("The cat\nCaf\xe9 au lait\n".encode("latin-1"))
    cases = {
        "missing input": ([path, "--input", tmp_path / "nope.txt"], r"nope.txt: does not exist"),
        "latin-1": ([path, "--input", latin], r"latin1.txt:2: the file is not valid UTF-8 .*iconv"),
        "output folder": (
            [path, "--input", good, "--output", tmp_path / "no" / "o.tsv"],
            r"does not exist.*mkdir -p",
        ),
        "no extractor": ([tmp_path, "--input", good], r"no reduced extractor here"),
        "bad device": ([path, "--input", good, "--device", "tpu"], r"device='tpu'"),
    }
    for name, (argv, pattern) in cases.items():
        rc, out, err = predict_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "", name
        assert len(lines) == 1 and lines[0].startswith("lexp: error: "), (name, err)
        assert re.search(pattern, lines[0]), (name, lines[0])
    (path / "probe.safetensors").unlink()
    rc, _, err = predict_cli([path, "--input", good], capsys)
    assert rc == 2 and "probe.safetensors: missing" in err and len(err.strip().splitlines()) == 1


def test_predict_long_sentences_flag(tmp_path: Path, capsys) -> None:
    from test_extractor import predict_cli, save_tiny_extractor

    path, _ = save_tiny_extractor(tmp_path)  # tiny BERT: 128 positions
    capsys.readouterr()
    text = tmp_path / "long.txt"
    text.write_text("A cat\n" + " ".join(["the quick brown fox"] * 40) + "\n", encoding="utf-8")
    rc, _, err = predict_cli([path, "--input", text, "--device", "cpu"], capsys)
    assert rc == 2 and "long.txt:2" in err and "--long-sentences window" in err
    assert "extract.long_sentences" not in err and len(err.strip().splitlines()) == 1
    output = tmp_path / "tags.tsv"
    rc, _, err = predict_cli(
        [path, "--input", text, "--long-sentences", "window", "--output", output], capsys
    )
    assert rc == 0, err
    blocks = output.read_text(encoding="utf-8").strip().split("\n\n")
    assert [len(b.splitlines()) for b in blocks] == [2, 160]

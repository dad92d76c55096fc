"""The results.json schema and its one reader, :func:`load_results`.

Every run writes ``<run_dir>/results.json`` through :class:`lexp.report.results.Report`, which puts
``schema_version`` first. Everything that reads a results.json (:mod:`lexp.report.tables`,
:mod:`lexp.report.html`, notebooks) goes through :func:`load_results`: it upgrades an older file to
the current version *in memory* (the file is never rewritten) and refuses a file newer than this
lexp with an error that names the file and says to upgrade lexp. The consumers therefore know one
set of names only, and a rename is one upgrade step here instead of a special case in every view.

::

    from lexp.report.results_schema import load_results
    res = load_results("outputs/run/results.json")   # Results: a read-only mapping, always v2
    res["pipeline"]["pct_reduction"], res.schema_version, res.source_version   # 88.1, 2, 1

Naming rule (v2)
----------------
*Scores* — accuracy, macro-F1, Pearson/Spearman (MSE for regression), linear CKA, control accuracy,
selectivity (score - control score), and targets derived from scores (``ls_target``,
``target_dev``, ``threshold_score_dev``) — are raw values: fractions in [0, 1] (Pearson in
[-1, 1]), never scaled, named without a unit (``dev``, ``oracle_test``, ``ccfs_dev``, ``cka``).
A ``<x>_std`` (or ``std: {<x>: …}``) beside a number is its standard deviation over probe seeds in
the unit of ``<x>``; ``<x>_per_seed`` lists its per-seed values.

*Shares of the model* (of its neurons, clusters or layers) are percentages in [0, 100] and their
names start with ``pct``: ``pct_removed``, ``pct_of_all``, ``pct_reduction``, ``makeup.pct``.

*Score multipliers* — the settings that say how much of a score a selection keeps or may lose —
stay fractions as in the config: ``threshold`` (``analysis.redundancy_threshold``: a layer is
redundant at dev >= threshold x oracle dev), ``target_fraction``, ``ls_delta``, ``fs_delta``.
Ratios that are not shares say so: ``speedup``, ``speedup_at_ls``, ``padding_ratio``.

*Layers* are the hidden states 0..L, layer 0 = the embeddings. ``n_layers`` and any
``*_n_layers`` / ``n_layers_*`` are counts of hidden-state layers, the embeddings included
(MiniLM: ``n_layers`` = 7). ``layer`` and ``*_layer`` hold one layer index; ``*_layers`` (without
``n_``) a list of layer indices. "Layers 0..k" (LayerSelector, truncated encoders) is
``*_layer`` = k together with ``*_n_layers`` = k + 1. No other key holds a layer number.

*Per-row tables* are lists of objects named ``table`` (``layers.table``: Table 7, one row per
layer). ``general.table6`` (Table 6, one row per ct) keeps its version-1 name in version 2:
:mod:`lexp.sweep` and tests/test_run.py still read it without this reader; renaming it to
``general.table`` is the next version's step once they read through :func:`load_results`.

``config`` is the resolved Hydra config exactly as the run had it; the rule does not apply there.

Keys (v2)
---------
Top level, every run: ``schema_version`` (int), ``status`` (``running`` | ``complete`` |
``failed: <message>`` | multirun jobs: ``killed (<why>)`` (SIGTERM, a SLURM time limit, a job
SLURM ended without a result) | ``requeued (...)`` (until the requeued SLURM job starts again)),
``slurm`` (a requeued SLURM job: ``job_id``, ``restarts``), ``task``, ``model``, ``analysis``,
``lexp_version``, ``command``, ``python``,
``config``, ``timings_s`` (stage -> seconds; ``total``), ``figures`` (paths relative to the run
directory), ``device`` (``device``, ``type``, ``name``, ``threads``), ``device_stages`` (stage ->
device, dtype). After reading the task: ``task_kind`` (labelling | classification | regression),
``data_files``, ``counts`` (split -> sentences, tokens), ``n_labels``, ``labels``,
``unseen_labels``, ``unseen_label_counts``, ``task_notes``, ``control_task`` (task.control).
``model_family`` (lexp.encoders.families: ``family``, ``tokenizer_class``, ``tokenizer_kind``,
``cls_position``, ``padding_side``, ``pad_token``, ``adds_special_tokens``, ``word_alignment``,
``sentence``: the resolved extract.sentence of sentence tasks, null for word tasks). After
extraction: ``model_dir``, ``n_layers``, ``hidden``, ``n_neurons`` (= n_layers x hidden),
``stores``, ``stores_reused``, ``store_labels`` (split -> the task's label entry in the store,
``<task>-<fp12>``; open with ``open_store(stores[split], task=store_labels[split])``),
``labels_reused``, ``rows`` (split -> rows: words or examples), ``extraction``
(split -> batch/token counts, ``padding_ratio``, ``seconds``, ``words_per_second``), ``finetune``
(sentence tasks: ``metrics`` split -> scores). ``oracle``: ``metric``, ``dev``/``test`` (metric ->
score, ``<metric>_std``), ``best_epoch``, ``dev_history``, ``train_seconds``, ``heads_in_pass``;
with probe.seeds ``seeds``, ``per_seed``; with a control task ``control`` and ``selectivity``
(same shape). ``summary_lines``: what the run printed.

Per analysis (the block named after it):

- ``general`` (Table 6, Fig. 1-3): ``metric``, ``split``, ``n_neurons_total``, ``oracle_dev``,
  ``oracle_test``, ``cache``, ``cache_reused``, ``table6`` (one row per ct: ``ct``, ``n_neurons``,
  ``pct_removed``, ``makeup`` {``n_neurons``, ``n_clusters``, ``n_multi``, ``n_singletons``,
  ``pct_removed``, ``counts``, ``pct``, ``pct_with_singletons``}, with a probe ``dev``, ``test``,
  ``probe``), ``representatives`` (ct -> neuron indices), ``cka`` / ``cka_debiased``
  (layer x layer), ``cka_adjacent`` / ``cka_adjacent_debiased`` (layer i vs i + 1).
- ``layers`` (Table 7): ``metric``, ``oracle_dev``, ``oracle_test``, ``threshold``,
  ``threshold_score_dev``, ``table`` (one row per layer: ``layer``, ``dev``, ``test``,
  ``incremental_dev``/``_test`` (layers 0..layer), ``redundant``, with a control task
  ``control_dev``/``_test`` and ``selectivity_dev``/``_test``), ``oracle_control_dev``/``_test``,
  ``oracle_selectivity_dev``/``_test``, ``redundant_layers``, ``heads`` (head name -> probe).
- ``neurons`` (Table 8, Tables 1-2): ``metric``, ``oracle_dev``, ``oracle_test``,
  ``target_fraction``, ``target_dev``, ``reached``, ``n_neurons``, ``pct_of_all``,
  ``reduced_dev``, ``reduced_test``, ``evaluated`` ([n, dev] pairs), ``selected_neurons``,
  ``selected_per_layer`` (neurons chosen in each layer), ``ranking``, ``probe``; control and
  selectivity keys as in ``layers``; with seeds ``n_neurons_per_seed`` etc.
- ``pipeline`` (Tables 3, 9, 10): ``n_neurons_total``, ``oracle_dev``, ``oracle_test``,
  ``ls_delta``, ``ls_target``, ``ls_reached``, ``ls_layer``, ``ls_n_layers``, ``ls_n_neurons``,
  ``ls_dev``, ``ls_test``, ``ct``, ``cc_n_neurons``, ``cc_dev``, ``cc_test``, ``fs_delta``,
  ``fs_target``, ``fs_reached``, ``ccfs_n_neurons``, ``ccfs_dev``, ``ccfs_test``,
  ``pct_reduction`` (100 x (1 - ccfs_n_neurons / n_neurons_total), the paper's "% Reduct."),
  ``cc_columns``, ``ccfs_columns``, ``fs_evaluated``, ``metric``, ``seconds``; with probe.seeds
  ``<x>_std``, ``<x>_per_seed``, ``seeds``, ``per_seed`` (the same keys per seed),
  ``extractor_seed``.
- ``pipeline_timing``: ``device``, ``forward`` (one record per encoder, the full one first:
  ``last_layer`` (layers 0..last_layer kept), ``n_sentences``, ``seconds``,
  ``seconds_per_sentence``, ``runs``, ``speedup``), ``ls_layer``, ``speedup_at_ls`` (the record
  with ``last_layer`` = ``ls_layer``), ``sentences_timed``, ``forward_wall_seconds``,
  ``classifier`` (records per feature count), ``classifier_wall_seconds``.
- ``extractor``: ``path``, ``n_layers_kept``, ``n_neurons``, ``test_<metric>_reloaded`` /
  ``_reported``.
- ``compare`` (cross-model CKA): ``models``, ``split``, ``rows``, ``model_a`` / ``model_b``
  (``config``, ``n_layers``, ``hidden``, ``store``), ``cka`` / ``cka_debiased`` (A layer x B
  layer), ``cka_a``, ``cka_b`` (+ ``_debiased``), ``best_b_layers`` (per layer of A, the B layer
  of highest CKA), ``diagonal`` / ``diagonal_debiased``, ``cache``, ``cache_reused``, ``pass_s``.

Version history
---------------
1. No ``schema_version`` key: every results.json written before it was introduced, and the
   record :func:`lexp.sweep.failure_record` writes for a job that failed before the run started
   (it holds no analysis block, so reading it as version 1 changes nothing).
2. ``schema_version: 2``, the naming rule above. Upgrade from 1 (:func:`upgrade`):
   ``pipeline.reduction`` (a fraction) -> ``pipeline.pct_reduction`` (x 100; also
   ``reduction_std``, ``reduction_per_seed`` and ``per_seed[].reduction``);
   ``pipeline_timing.ls_layers`` (an index) -> ``pipeline_timing.ls_layer``;
   ``pipeline_timing.forward[].n_layers`` (transformer blocks kept = the last layer's index)
   -> ``forward[].last_layer``; ``compare.best_match_b`` -> ``compare.best_b_layers``.
   Nothing else changed: a v1 file gives the same tables as before.

To change the schema: bump :data:`SCHEMA_VERSION`, add ``UPGRADES[old]`` (a pure function of the
previous version's dict), change the writers, list the change above, and add a test that a file
of the old version reads as the new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lexp
from lexp.errors import LexpInputError

#: the version :class:`lexp.report.results.Report` writes and :func:`load_results` returns
SCHEMA_VERSION = 2
#: files without ``schema_version`` were written before it existed
UNVERSIONED = 1
RESULTS = "results.json"


class ResultsError(LexpInputError):
    """A results.json that cannot be read as a lexp results file; ``reason`` says why (no path)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnreadableResults(ResultsError):
    """Not readable, not JSON, or not a JSON object."""


class UnknownSchemaVersion(ResultsError):
    """A ``schema_version`` this lexp does not know: newer than it, or not a version at all."""


# ------------------------------------------------------------------------------------- upgrades
def _as_pct(block: dict[str, Any], old: str, new: str) -> None:
    """``block[old]`` (a fraction) -> ``block[new]`` in percent, with its ``_std`` and ``_per_seed``.

    A block that already has ``new`` keeps it (a v1 file from a writer mid-upgrade).
    """
    for suffix in ("", "_std", "_per_seed"):
        if old + suffix not in block:
            continue
        value = block.pop(old + suffix)
        if new + suffix in block:
            continue
        block[new + suffix] = _times(value, 100.0)


def _times(value: Any, factor: float) -> Any:
    """``factor`` x a number (or each number of a list); anything else as it is."""
    if isinstance(value, list):
        return [_times(v, factor) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return factor * float(value)
    return value


def _rename(block: Any, old: str, new: str) -> None:
    if isinstance(block, dict) and old in block:
        value = block.pop(old)
        block.setdefault(new, value)


def pct_reduction(block: dict[str, Any]) -> dict[str, Any]:
    """A CCFS result (``pipeline`` block or one ``per_seed`` entry) with ``reduction`` as
    ``pct_reduction``: the v2 writer and the v1 upgrade share it, so both give the same floats."""
    _as_pct(block, "reduction", "pct_reduction")
    return block


def forward_record(record: dict[str, Any]) -> dict[str, Any]:
    """A :func:`lexp.redundancy.timing.forward_speedups` record as results.json v2 holds it:
    its ``n_layers`` (transformer blocks kept = index of the last layer kept) as ``last_layer``."""
    _rename(record, "n_layers", "last_layer")
    return record


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict):
        pct_reduction(pipeline)
        for entry in pipeline.get("per_seed") or []:
            if isinstance(entry, dict):
                pct_reduction(entry)
    timing = data.get("pipeline_timing")
    if isinstance(timing, dict):
        _rename(timing, "ls_layers", "ls_layer")
        for record in timing.get("forward") or []:
            if isinstance(record, dict):
                forward_record(record)
    _rename(data.get("compare"), "best_match_b", "best_b_layers")
    return data


#: ``UPGRADES[v]`` turns a version-``v`` dict (a private copy) into version ``v + 1``
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def version_of(data: Mapping[str, Any], path: str | Path = "<results>") -> int:
    """The file's schema version (:data:`UNVERSIONED` without the key); refuses unknown ones."""
    if "schema_version" not in data:
        return UNVERSIONED
    version = data["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < UNVERSIONED:
        raise UnknownSchemaVersion(
            path,
            f"has schema_version {version!r}, which is not a version (an integer "
            f"{UNVERSIONED}..{SCHEMA_VERSION}); the file is damaged: rerun the run, or remove the "
            f"key if the rest of the file is intact",
        )
    if version > SCHEMA_VERSION:
        wrote = data.get("lexp_version")
        raise UnknownSchemaVersion(
            path,
            f"has schema_version {version}, newer than this lexp ({lexp.__version__}) reads (up to "
            f"{SCHEMA_VERSION}): upgrade lexp to the version that wrote it"
            + (f" (lexp_version {wrote})" if isinstance(wrote, str) else "")
            + " (git pull in the lexp checkout) to read it",
        )
    return version


def upgrade(data: Mapping[str, Any], path: str | Path = "<results>", *, copy: bool = True) -> dict[str, Any]:
    """A results dict of any known version as version :data:`SCHEMA_VERSION`, ``schema_version``
    first and the other keys in their order. ``copy=False`` upgrades ``data``'s nested blocks in
    place (for a dict nobody else holds: :func:`load_results` skips a deep copy of a large file)."""
    version = version_of(data, path)
    out = deepcopy(dict(data)) if copy else dict(data)
    while version < SCHEMA_VERSION:
        out = UPGRADES[version](out)
        version += 1
    out.pop("schema_version", None)
    return {"schema_version": SCHEMA_VERSION, **out}


# --------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class Results(Mapping[str, Any]):
    """One results.json at :data:`SCHEMA_VERSION`: a read-only mapping over the upgraded dict.

    ``source_version`` is the version found in the file (1 when it had no ``schema_version``);
    ``mtime_ns`` its modification time (newest wins when runs repeat). Treat ``data`` as frozen.
    """

    path: Path
    mtime_ns: int
    source_version: int
    data: dict[str, Any] = field(repr=False)

    @property
    def schema_version(self) -> int:
        return int(self.data["schema_version"])

    @property
    def upgraded(self) -> bool:
        """True when the file is older than :data:`SCHEMA_VERSION` (read through :func:`upgrade`)."""
        return self.source_version != self.schema_version

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


#: Deeper nesting than any results.json lexp writes (about 8 levels): readers recurse over it.
MAX_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (stops counting past MAX_DEPTH + 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def load_results(path: str | Path) -> Results:
    """Read and upgrade one results.json; :class:`UnreadableResults` if it cannot be read or is
    not a JSON object, :class:`UnknownSchemaVersion` if its version is newer than this lexp's."""
    path = Path(path)
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableResults(path, f"cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise UnreadableResults(path, f"is not UTF-8 text ({exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnreadableResults(path, f"is not valid JSON ({exc})") from exc
    except RecursionError:  # json's C parser recurses once per level
        raise UnreadableResults(
            path, "nests JSON too deeply to be a results.json (hand-made or damaged)"
        ) from None
    if not isinstance(data, dict):
        raise UnreadableResults(path, f"is not a JSON object (found {type(data).__name__})")
    depth = _depth(data)
    if depth > MAX_DEPTH:
        raise UnreadableResults(
            path,
            f"nests {depth} levels deep; a results.json nests at most {MAX_DEPTH} (hand-made or damaged)",
        )
    source = version_of(data, path)
    return Results(
        path=path, mtime_ns=stat.st_mtime_ns, source_version=source, data=upgrade(data, path, copy=False)
    )

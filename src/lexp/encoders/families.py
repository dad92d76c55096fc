"""One small adapter per model family, chosen from the tokenizer and the config, never from a name.

What differs between BERT, RoBERTa, DeBERTa, ModernBERT, XLNet, GPT-2, Llama, Qwen, Mistral, Gemma
... for lexp is four facts, all read from the loaded tokenizer and config:

* **word alignment**: always the fast tokenizer's ``word_ids()`` (byte-level BPE with or without a
  prefix space, sentencepiece ``▁``, WordPiece ``##``, BOS-only or no special tokens at all); a
  word's vector is one of its own subwords, never a special token. A slow-only tokenizer has no
  ``word_ids()``: `require_fast` fails before any work.
* **sentence vector** (``extract.sentence``): ``cls`` = the tokenizer's classification token
  (first for BERT-likes, last for XLNet), ``last`` = the last non-padding token (what a decoder's
  sequence-classification head reads), ``mean`` = the mean over the sentence's tokens without
  special tokens; ``auto`` = ``cls`` where the tokenizer has one, else ``last``.
* **padding**: either side works (positions come from the lengths); a tokenizer without a pad
  token (GPT-2, Llama, Mistral) gets its EOS (else its UNK) as pad token, as transformers documents
  for fine-tuning decoders; the model's ``config.pad_token_id`` follows it.
* **final norm**: decoders (and ModernBERT, T5's encoder) normalise the last layer's output; a model
  truncated to fewer layers must not, so that its last state equals the full model's state there.

Encoder-decoder checkpoints (T5, mT5, UMT5, T5Gemma) are read through their encoder alone
(`encoder_class`: transformers' ``AutoModelForTextEncoding``); their sentence vector under ``auto``
is the ``mean`` of the tokens (no classification token, and the encoder is bidirectional, so its
last token is not a summary). Other encoder-decoders (BART, Pegasus, Marian) are one clear error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from lexp.errors import LexpInputError, LexpModelError

__all__ = [
    "SENTENCE_MODES",
    "FamilyAdapter",
    "adapter_for",
    "cls_position",
    "encoder_class",
    "ensure_pad_token",
    "require_fast",
    "tokenizer_kind",
]

log = logging.getLogger(__name__)

SENTENCE_MODES = ("auto", "cls", "last", "mean")
#: Attribute names of a base model's final norm (GPT-2 ``ln_f``; Llama/Qwen/Mistral/Gemma ``norm``;
#: ModernBERT ``final_norm``), applied to the last layer's output only.
FINAL_NORMS = ("ln_f", "norm", "final_norm", "final_layer_norm")


def require_fast(tokenizer: Any, where: str = "") -> None:
    """One clear error for a slow-only tokenizer: lexp aligns words through ``word_ids()``."""
    if not getattr(tokenizer, "is_fast", False):
        at = f" of {where}" if where else ""
        raise LexpModelError(
            f"the tokenizer{at} ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; lexp needs one "
            "to align subwords to words (word_ids). Fix: save a tokenizer.json next to the model "
            "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR))."
        )


def tokenizer_kind(tokenizer: Any) -> str:
    """``wordpiece``, ``byte-level bpe``, ``sentencepiece bpe``, ``sentencepiece unigram`` ... read
    from the fast tokenizer's own model and pre-tokenizer."""
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        return "unknown"
    model = str((spec.get("model") or {}).get("type", "unknown")).lower()
    text = json.dumps([spec.get(k) for k in ("pre_tokenizer", "normalizer", "decoder")], ensure_ascii=False)
    if model == "wordpiece":
        return "wordpiece"
    if "ByteLevel" in text:
        return f"byte-level {model}"
    if "Metaspace" in text or "▁" in text:
        return f"sentencepiece {model}"
    return model


def cls_position(tokenizer: Any) -> str | None:
    """Where the tokenizer puts its classification token: ``"first"`` (BERT), ``"last"`` (XLNet) or
    None (no cls token: GPT-2, Llama, ...). Decided from an actual encoding of a pair."""
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is None:
        return None
    probe = list(tokenizer("a", "b")["input_ids"])
    if probe and probe[0] == cls_id:
        return "first"
    if probe and probe[-1] == cls_id:
        return "last"
    return None


def ensure_pad_token(tokenizer: Any, model: Any = None) -> str | None:
    """Give a tokenizer without a pad token its EOS (else UNK) as pad token, and the model's config
    the same ``pad_token_id``; returns the token now used, or None when nothing changed."""
    if tokenizer.pad_token_id is None:
        for name in ("eos_token", "unk_token", "bos_token"):
            token = getattr(tokenizer, name, None)
            if token is not None:
                tokenizer.pad_token = token
                log.info("the tokenizer has no pad token: padding with its %s %r", name, token)
                break
        else:
            raise LexpModelError(
                f"the tokenizer ({type(tokenizer).__name__}) has no pad, eos, unk or bos token; batches "
                "cannot be padded. Fix: add one (tokenizer.pad_token = ...) and save it next to the model."
            )
        changed: str | None = str(tokenizer.pad_token)
    else:
        changed = None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return changed


@dataclass(frozen=True)
class FamilyAdapter:
    """The facts of one model family that extraction, fine-tuning and truncation need."""

    family: str  # config.model_type
    tokenizer_class: str
    tokenizer_kind: str
    cls_position: str | None  # first | last | None
    padding_side: str
    pad_token: str | None
    adds_special_tokens: list[str]  # what the tokenizer adds around one sentence
    seq2seq_encoder: bool = False  # the encoder of an encoder-decoder checkpoint (T5): auto = mean

    def sentence(self, asked: str, where: str = "") -> str:
        """The representation ``extract.sentence=asked`` gives for this family (``auto`` resolved);
        a ``cls`` this family has not is one clear error, raised before any fine-tuning."""
        if asked not in SENTENCE_MODES:
            raise LexpInputError(f"extract.sentence={asked!r} is not one of {SENTENCE_MODES}")
        if asked == "auto":
            if self.cls_position is not None:
                return "cls"
            return "mean" if self.seq2seq_encoder else "last"
        if asked == "cls" and self.cls_position is None:
            at = f" ({where})" if where else ""
            raise LexpInputError(
                f"extract.sentence=cls: the {self.family} tokenizer{at} has no classification token that it "
                "puts first or last, so there is no [CLS] representation. Fix: extract.sentence=last (the "
                "last token, what its sequence-classification head reads), mean, or auto."
            )
        return asked

    def describe(self, sentence: str | None = None) -> dict[str, Any]:
        """The JSON facts results.json records (``model_family``)."""
        return asdict(self) | {"word_alignment": "word_ids", "sentence": sentence}


def adapter_for(model_or_config: Any, tokenizer: Any) -> FamilyAdapter:
    """The adapter of a loaded model (or its config) and its fast tokenizer."""
    config = getattr(model_or_config, "config", model_or_config)
    require_fast(tokenizer)
    probe = tokenizer("a")
    tokens = tokenizer.convert_ids_to_tokens(list(probe["input_ids"]))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    return FamilyAdapter(
        family=str(getattr(config, "model_type", "unknown")),
        tokenizer_class=type(tokenizer).__name__,
        tokenizer_kind=tokenizer_kind(tokenizer),
        cls_position=cls_position(tokenizer),
        padding_side=str(getattr(tokenizer, "padding_side", "right")),
        pad_token=None if tokenizer.pad_token is None else str(tokenizer.pad_token),
        adds_special_tokens=[t for t in tokens if t in special],
        seq2seq_encoder=_seq2seq_encoder(config),
    )


def _seq2seq_encoder(config: Any) -> bool:
    """Whether ``config`` is an encoder-decoder family that lexp reads through its encoder class.

    Decided by the model type, not ``is_encoder_decoder``: T5EncoderModel sets that flag to False
    on the config it is given, so a loaded encoder's config no longer says it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    name = MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(str(getattr(config, "model_type", "")), "")
    return "Encoder" in name


def encoder_class(config: Any) -> Any:
    """The transformers auto class that loads the encoder lexp reads for ``config``: ``AutoModel``,
    or ``AutoModelForTextEncoding`` for an encoder-decoder family with an encoder-only class (T5 →
    T5EncoderModel; its decoder is never loaded). Any other encoder-decoder is one clear error:
    ``AutoModel`` would give a model whose forward needs decoder inputs."""
    from transformers import AutoModel, AutoModelForTextEncoding

    if _seq2seq_encoder(config):
        return AutoModelForTextEncoding
    if getattr(config, "is_encoder_decoder", False):
        kind = getattr(config, "model_type", "unknown")
        raise LexpModelError(
            f"{kind} is an encoder-decoder model without an encoder-only class in transformers; lexp "
            "analyses encoders (BERT-likes, the encoder of T5/mT5/UMT5) and decoders (GPT-2, Llama, ...). "
            "Fix: save its encoder as a model of its own (e.g. BartModel.get_encoder()) or use another model."
        )
    return AutoModel


def final_norm_name(base_model: Any) -> str | None:
    """The path below ``base_model`` of its final norm (applied after the last layer): ``norm``,
    ``ln_f``, ... or ``encoder.final_layer_norm`` (T5's encoder stack); None if it has none."""
    for owner, prefix in ((base_model, ""), (getattr(base_model, "_modules", {}).get("encoder"), "encoder.")):
        modules = getattr(owner, "_modules", {})
        name = next((n for n in FINAL_NORMS if modules.get(n) is not None), None)
        if name is not None:
            return prefix + name
    return None


def inspect_model(model_dir: Any, sentence: str = "auto", *, sentence_task: bool = False) -> dict[str, Any]:
    """The family facts of a model folder from its config and tokenizer alone (no weights: seconds),
    so that a representation the family cannot give fails before fine-tuning or extraction.

    Returns `FamilyAdapter.describe` with ``sentence`` resolved for sentence tasks (None for word
    tasks, which take a word's own subword).
    """
    from transformers import AutoConfig, AutoTokenizer

    where = str(model_dir)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LexpModelError(f"cannot read the config or tokenizer in {where}: {exc}") from None
    require_fast(tokenizer, where)
    encoder_class(config)  # an encoder-decoder lexp cannot read fails here, before fine-tuning
    adapter = adapter_for(config, tokenizer)
    resolved = adapter.sentence(str(sentence), where) if sentence_task else None
    return adapter.describe(resolved)


def takes_segments(model: Any) -> bool:
    """Whether to pass segment ids (token_type_ids): the forward takes them and the model has
    segment parameters of its own (BERT-likes' ``token_type_embeddings``, XLNet's ``seg_embed``).
    GPT-2's forward takes them too but looks them up in its word embeddings: zeros there would add
    the embedding of token 0 to every position, so it gets none."""
    import inspect

    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    return any("token_type" in name or "seg_embed" in name for name, _ in model.named_parameters())

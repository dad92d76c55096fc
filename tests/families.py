"""Tiny random models of every supported Hugging Face family, with tokenizers trained here.

Each builder trains the family's kind of tokenizer (WordPiece, byte-level BPE, sentencepiece-style
BPE or unigram) with the `tokenizers` library on a few hundred EWT sentences, wraps it in the
family's own transformers tokenizer class (so special tokens, padding side and the missing pad
token of Llama/Mistral/GPT-2 are as in the real checkpoints), builds the model from a transformers
config with tiny sizes and saves both to a folder (what ``model.name_or_path=`` takes).
No network; a model takes about a second. :func:`build_family` caches folders per process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

EWT = "ud_english_ewt/en_ewt-ud-train.conllu"
N_SENTENCES = 400
VOCAB = 400
SIZE = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "positions": 256}

#: family -> (tokenizer kind as lexp reports it, expected sentence representation under auto)
FAMILIES: dict[str, tuple[str, str]] = {
    "bert": ("wordpiece", "cls"),
    "distilbert": ("wordpiece", "cls"),
    "electra": ("wordpiece", "cls"),
    "roberta": ("byte-level bpe", "cls"),
    "modernbert": ("byte-level bpe", "cls"),
    "deberta-v2": ("sentencepiece unigram", "cls"),
    "albert": ("sentencepiece unigram", "cls"),
    "xlnet": ("sentencepiece unigram", "cls"),
    "gpt2": ("byte-level bpe", "last"),
    "qwen2": ("byte-level bpe", "last"),
    "llama": ("sentencepiece bpe", "last"),
    "mistral": ("sentencepiece bpe", "last"),
    "gemma": ("sentencepiece bpe", "last"),
    "t5": ("sentencepiece unigram", "mean"),  # encoder-decoder: lexp reads its encoder
}


def ewt_sentences(data_root: Path, n: int = N_SENTENCES) -> list[str]:
    """The raw text of the first ``n`` EWT train sentences (``# text =`` lines)."""
    out = []
    with open(Path(data_root) / EWT, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("# text = "):
                out.append(line[len("# text = ") :].strip())
                if len(out) == n:
                    break
    return out


def _train(model: Any, trainer: Any, pre: Any, texts: list[str], normalizer: Any = None) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(texts, trainer)
    return json.loads(tok.to_str())["model"]


def wordpiece_vocab(texts: list[str]) -> dict[str, int]:
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trained = _train(
        models.WordPiece(unk_token="[UNK]"),
        trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=special),
        pre_tokenizers.BertPreTokenizer(),
        texts,
        normalizers.BertNormalizer(lowercase=True),
    )
    return trained["vocab"]


def bytelevel_bpe(texts: list[str], special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import models, pre_tokenizers, trainers

    trained = _train(
        models.BPE(),
        trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        texts,
    )
    return trained["vocab"], [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]
    ]


def metaspace_bpe(texts: list[str], special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import models, pre_tokenizers, trainers

    trained = _train(
        models.BPE(unk_token=special[0]),
        trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        texts,
    )
    return trained["vocab"], [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]
    ]


def unigram_vocab(texts: list[str], special: list[str], unk: str) -> list[tuple[str, float]]:
    from tokenizers import models, pre_tokenizers, trainers

    trained = _train(
        models.Unigram(),
        trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=special, unk_token=unk),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        texts,
    )
    return [(piece, float(score)) for piece, score in trained["vocab"]]


# ------------------------------------------------------------------------------------ tokenizers
def _tokenizer(family: str, texts: list[str]) -> Any:
    import transformers as tf

    if family in ("bert", "distilbert", "electra"):
        cls = {"bert": tf.BertTokenizer, "distilbert": tf.DistilBertTokenizer, "electra": tf.ElectraTokenizer}
        return cls[family](vocab=wordpiece_vocab(texts))
    if family == "roberta":
        vocab, merges = bytelevel_bpe(texts, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return tf.RobertaTokenizer(vocab=vocab, merges=merges)
    if family == "gpt2":
        vocab, merges = bytelevel_bpe(texts, ["<|endoftext|>"])
        return tf.GPT2Tokenizer(vocab=vocab, merges=merges)  # no pad token, adds no special token
    if family == "qwen2":
        vocab, merges = bytelevel_bpe(texts, ["<|endoftext|>"])
        return tf.Qwen2Tokenizer(vocab=vocab, merges=merges)
    if family == "modernbert":  # ModernBERT ships a generic fast tokenizer: OLMo BPE + [CLS] ... [SEP]
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

        special = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        vocab, merges = bytelevel_bpe(texts, special)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return tf.PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            mask_token="[MASK]",
        )
    if family in ("llama", "mistral"):  # as the real checkpoints: BOS added, no pad token
        vocab, merges = metaspace_bpe(texts, ["<unk>", "<s>", "</s>"])
        return tf.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    if family == "gemma":
        vocab, merges = metaspace_bpe(texts, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
        return tf.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    if family == "albert":
        special = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        return tf.AlbertTokenizer(vocab=unigram_vocab(texts, special, "<unk>"))
    if family == "deberta-v2":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        return tf.DebertaV2Tokenizer(vocab=unigram_vocab(texts, special, "[UNK]"))
    if family == "t5":  # as t5-small: </s> after each sentence, no cls, pad 0
        return tf.T5Tokenizer(vocab=unigram_vocab(texts, ["<pad>", "</s>", "<unk>"], "<unk>"), extra_ids=0)
    if family == "xlnet":
        special = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"]
        return tf.XLNetTokenizer(vocab=unigram_vocab(texts, special, "<unk>"))
    raise KeyError(family)


# ---------------------------------------------------------------------------------------- models
def _config(family: str, tokenizer: Any) -> Any:
    import transformers as tf

    h, n, a, i, p = (SIZE[k] for k in ("hidden", "layers", "heads", "intermediate", "positions"))
    v = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    bert_like = {
        "vocab_size": v,
        "hidden_size": h,
        "num_hidden_layers": n,
        "num_attention_heads": a,
        "intermediate_size": i,
        "max_position_embeddings": p,
        "pad_token_id": tokenizer.pad_token_id,
    }
    decoder = {
        "vocab_size": v,
        "hidden_size": h,
        "num_hidden_layers": n,
        "num_attention_heads": a,
        "num_key_value_heads": 1,
        "intermediate_size": i,
        "max_position_embeddings": p,
        **ids,
    }
    makers: dict[str, Callable[[], Any]] = {
        "bert": lambda: tf.BertConfig(**bert_like),
        "electra": lambda: tf.ElectraConfig(**bert_like, embedding_size=h),
        "roberta": lambda: tf.RobertaConfig(**{**bert_like, "max_position_embeddings": p + 2}),
        "deberta-v2": lambda: tf.DebertaV2Config(**bert_like),
        "albert": lambda: tf.AlbertConfig(**bert_like, embedding_size=16),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=v,
            dim=h,
            n_layers=n,
            n_heads=a,
            hidden_dim=i,
            max_position_embeddings=p,
            pad_token_id=tokenizer.pad_token_id,
        ),
        "modernbert": lambda: tf.ModernBertConfig(
            **bert_like,
            global_attn_every_n_layers=2,
            local_attention=16,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        "xlnet": lambda: tf.XLNetConfig(
            vocab_size=v, d_model=h, n_layer=n, n_head=a, d_inner=i, pad_token_id=tokenizer.pad_token_id
        ),
        "gpt2": lambda: tf.GPT2Config(vocab_size=v, n_embd=h, n_layer=n, n_head=a, n_positions=p, **ids),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "llama": lambda: tf.LlamaConfig(**decoder),
        "mistral": lambda: tf.MistralConfig(**decoder, sliding_window=None),
        "gemma": lambda: tf.GemmaConfig(**decoder, head_dim=h // a),
        "t5": lambda: tf.T5Config(  # saved whole (T5Model: encoder and decoder), as real checkpoints are
            vocab_size=v,
            d_model=h,
            num_layers=n,
            num_heads=a,
            d_kv=h // a,
            d_ff=i,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        ),
    }
    return makers[family]()


def save_family(family: str, folder: Path, data_root: Path, seed: int = 0) -> Path:
    """Build the tiny model of ``family`` and save it with its tokenizer to ``folder``."""
    from transformers import AutoModel

    tokenizer = _tokenizer(family, ewt_sentences(data_root))
    config = _config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


_BUILT: dict[tuple[str, str], Path] = {}


def build_family(family: str, root: Path, data_root: Path) -> Path:
    """The saved tiny model of ``family`` under ``root`` (built once per process)."""
    key = (family, str(root))
    if key not in _BUILT:
        _BUILT[key] = save_family(family, Path(root) / family, data_root)
    return _BUILT[key]

"""Tiny randomly initialised BERT and XLNet with locally built tokenizers (no hub, no network).

BERT: a WordPiece vocab file written here. XLNet: a sentencepiece model trained here. Sizes,
vocabulary, dropout and the sentencepiece corpus are keyword parameters; the defaults are the
models the extraction tests were written against.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase, XLNetModel

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the quick brown fox jump ##s ##ed ##ing over lazy dog . , ; a an "
    "##b ##c b c x ##x red green house cat ##ty run ##ner is was very old new and or not un ##like "
    "##ly tree ##top s ##o ##n ##e"
).split()
SP_TEXT = [
    "The quick brown fox jumps over the lazy dog .",
    "A second sentence , with commas and numbers 1234 .",
    "Dalvi et al. analysed redundancy in pretrained transformer models .",
    "Neurons in adjacent layers are highly correlated with each other .",
    "Most of the neurons can be removed without losing accuracy on the task .",
]
SP_CORPUS = tuple(SP_TEXT * 20)  # the default sentencepiece training text, one line each


def tiny_bert(
    tmp: Path,
    max_positions: int = 128,
    seed: int = 0,
    layers: int = 2,
    *,
    vocab: Sequence[str] = VOCAB,
    hidden: int = 32,
    intermediate: int = 64,
    dropout: float = 0.1,
) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): BertModel with 2 heads and a WordPiece tokenizer from ``vocab``.

    The vocab file goes to ``tmp / "bert-vocab"``; ``dropout`` sets hidden and attention dropout.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp / "bert-vocab"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 ignores BertTokenizer(vocab_file=...); from_pretrained converts the vocab file.
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == len(vocab)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval(), tokenizer


def tiny_xlnet(
    tmp: Path,
    seed: int = 0,
    layers: int = 2,
    *,
    hidden: int = 32,
    intermediate: int = 64,
    dropout: float = 0.1,
    sp_corpus: Sequence[str] = SP_CORPUS,
    sp_vocab: int = 80,
) -> tuple[XLNetModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): XLNetModel with 2 heads and a unigram sentencepiece model trained here.

    ``sp_corpus`` (lines) and ``sp_vocab`` (a soft limit) shape the sentencepiece model; its files
    go to ``tmp / "sp.*"`` and ``tmp / "xlnet-tok"``.
    """
    import sentencepiece as spm
    from transformers import XLNetConfig, XLNetModel, XLNetTokenizer

    corpus = tmp / "sp.txt"
    corpus.write_text("\n".join(sp_corpus), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "sp"),
        vocab_size=sp_vocab,
        hard_vocab_limit=False,
        model_type="unigram",
        control_symbols=["<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder = tmp / "xlnet-tok"
    folder.mkdir(exist_ok=True)
    shutil.copy(tmp / "sp.model", folder / "spiece.model")
    # transformers 5 ignores XLNetTokenizer(vocab_file=...) too; from_pretrained converts spiece.model.
    tokenizer = XLNetTokenizer.from_pretrained(str(folder))
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()
    # Every trained piece converted (the default's 80 > 40 is the check this helper always made).
    assert tokenizer.padding_side == "left" and tokenizer.is_fast
    assert len(tokenizer) == pieces > sp_vocab // 2
    config = XLNetConfig(
        vocab_size=len(tokenizer),
        d_model=hidden,
        n_layer=layers,
        n_head=2,
        d_inner=intermediate,
        dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return XLNetModel(config).eval(), tokenizer


def save_model(model, tokenizer, folder: Path) -> Path:
    """Save a tiny model + tokenizer as a local model folder (what `model.name_or_path=` takes)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder

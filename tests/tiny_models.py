"""Tiny randomly initialised BERT and XLNet with locally built tokenizers (no hub, no network).

BERT: a WordPiece vocab file written here. XLNet: a sentencepiece model trained here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

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


def tiny_bert(tmp: Path, max_positions: int = 128, seed: int = 0, layers: int = 2):
    """(model, tokenizer): BertModel with hidden 32 and a WordPiece tokenizer from a vocab file."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp / "bert-vocab"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # transformers 5 ignores BertTokenizer(vocab_file=...); from_pretrained converts the vocab file.
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == len(VOCAB)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval(), tokenizer


def tiny_xlnet(tmp: Path, seed: int = 0, layers: int = 2):
    """(model, tokenizer): XLNetModel with d_model 32 and a sentencepiece model trained here."""
    import sentencepiece as spm
    from transformers import XLNetConfig, XLNetModel, XLNetTokenizer

    corpus = tmp / "sp.txt"
    corpus.write_text("\n".join(SP_TEXT * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "sp"),
        vocab_size=80,
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
    assert tokenizer.padding_side == "left" and tokenizer.is_fast and len(tokenizer) > 40
    config = XLNetConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        n_layer=layers,
        n_head=2,
        d_inner=64,
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

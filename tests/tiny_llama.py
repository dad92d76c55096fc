"""A tiny randomly initialised Llama (decoder) with a byte-level BPE tokenizer trained here.

No hub, no network: the tokenizer is trained with the ``tokenizers`` library on a few hundred
sentences, as real Llama checkpoints ship it (a BOS token, no padding token). Used by the
layer-drop tests and, at real width (16 layers × 2048), by benchmarks/bench_wide.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from tiny_models import SP_CORPUS


def train_bpe(lines: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE PreTrainedTokenizerFast with <s>/</s> (BOS added), no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(lines), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(
    folder: Path,
    *,
    layers: int = 3,
    hidden: int = 32,
    intermediate: int = 64,
    heads: int = 4,
    lines: Iterable[str] | None = None,
    vocab_size: int = 600,
    seed: int = 0,
) -> Path:
    """Save a random LlamaForCausalLM (weights seeded) and its tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe(SP_CORPUS if lines is None else lines, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder

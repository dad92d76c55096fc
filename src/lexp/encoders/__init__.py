"""Encoders: loading pretrained models (`loading`), batched activation extraction (`extract`) and
task fine-tuning (`finetune`, the only Lightning module here; import it explicitly)."""

from lexp.encoders.extract import Extraction, ExtractionStats, extract_cls, extract_words
from lexp.encoders.loading import Encoder, load_encoder, model_max_tokens, resolve_name_or_path

__all__ = [
    "Encoder",
    "Extraction",
    "ExtractionStats",
    "extract_cls",
    "extract_words",
    "load_encoder",
    "model_max_tokens",
    "resolve_name_or_path",
]

"""lexp: analysing redundancy in pretrained transformers (Dalvi et al., EMNLP 2020)."""

__version__ = "0.1.0"

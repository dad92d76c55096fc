"""lexp: analysing redundancy in pretrained transformers (Dalvi et al., EMNLP 2020)."""

import os

__version__ = "0.1.0"

# The probes train with deterministic algorithms (Trainer(deterministic=True)). On CUDA that needs
# cuBLAS's fixed workspace, and torch reads this variable once, at the process's first cuBLAS
# product: Lightning sets it when the probes' Trainer is built, which is too late after extraction,
# fine-tuning or the covariance pass ran a product, and every later deterministic matmul would raise.
# Set it before torch touches cuBLAS (a value the user set wins). No effect on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

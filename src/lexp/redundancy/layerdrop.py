"""Layer redundancy as the LLM literature measures it, from the stored hidden states.

Hidden state ℓ (0 = embeddings) is the input of block ℓ and h_{ℓ+1} its output.

- **Block Influence** (ShortGPT, Men et al. 2024): ``BI_ℓ = 1 − mean_t cos(h_ℓ, h_{ℓ+1})``; a low
  BI marks a block that barely changes its input (a candidate to drop).
- **Angular distance** (Gromov et al. 2024): ``d(ℓ, ℓ+n) = mean_t arccos(cos(h_ℓ, h_{ℓ+n})) / π``;
  the block of n layers to drop is the ℓ* that minimises it (blocks ℓ*..ℓ*+n−1 go). Gromov et al.
  use each sequence's last token; here every stored word is a row (the word-level variant).
- **Adjacent linear CKA** (the paper's Figure 1 diagonal), from per-layer centred Gram blocks.

One pass gives the cosines and the column means; a second pass accumulates the centred Gram blocks
``X_ℓᵀX_ℓ`` and ``X_ℓᵀX_{ℓ+1}`` (float64, (2L−1)·H² values). With a transformers decoder the last
hidden state is taken after the model's final norm, so its BI includes that norm.

:func:`drop_blocks` removes blocks from a loaded model (encoder or decoder, any family whose
blocks sit in one ``nn.ModuleList`` of ``num_hidden_layers`` entries) for the drop test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lexp.errors import LexpInputError, LexpModelError

__all__ = ["best_blocks", "block_list", "drop_blocks", "layer_similarity", "perplexity"]


def layer_similarity(
    store: Any, *, max_gap: int = 4, chunk_rows: int = 8192, columns_of: Any = None
) -> dict[str, Any]:
    """BI per block, d(ℓ, ℓ+n) for n = 1..max_gap, and adjacent linear CKA of a store's layers."""
    L, H = int(store.n_layers), int(store.hidden)
    if L < 2:
        raise LexpInputError(
            f"{store.path}: layer similarity needs at least 2 hidden states, the store has {L}"
        )
    k = max(1, min(int(max_gap), L - 1))
    cos_sum = np.zeros((k, L - 1))
    ang_sum = np.zeros((k, L - 1))
    col_sum = np.zeros(L * H)
    n = 0
    for chunk in store.iter_chunks(chunk_rows):
        x = torch.from_numpy(np.array(chunk, dtype=np.float32)).view(-1, L, H)
        unit = x / torch.linalg.vector_norm(x, dim=2, keepdim=True).clamp_min(1e-12)
        for g in range(1, k + 1):
            c = (unit[:, :-g] * unit[:, g:]).sum(dim=2).clamp_(-1.0, 1.0).double()
            cos_sum[g - 1, : L - g] += c.sum(dim=0).numpy()
            ang_sum[g - 1, : L - g] += (torch.arccos(c) / np.pi).sum(dim=0).numpy()
        col_sum += x.reshape(x.shape[0], -1).double().sum(dim=0).numpy()
        n += x.shape[0]
    if n == 0:
        raise LexpInputError(f"{store.path}: the store has no rows")
    mean = torch.from_numpy((col_sum / n).astype(np.float32)).view(L, H)
    own = [torch.zeros((H, H), dtype=torch.float64) for _ in range(L)]
    cross = [torch.zeros((H, H), dtype=torch.float64) for _ in range(L - 1)]
    for chunk in store.iter_chunks(chunk_rows):
        x = torch.from_numpy(np.array(chunk, dtype=np.float32)).view(-1, L, H) - mean
        for a in range(L):
            own[a].add_(x[:, a].T @ x[:, a])
            if a < L - 1:
                cross[a].add_(x[:, a].T @ x[:, a + 1])
    norms = [float(torch.linalg.matrix_norm(g)) for g in own]
    cka = [
        float(torch.linalg.matrix_norm(cross[a]) ** 2 / (norms[a] * norms[a + 1]))
        if norms[a] * norms[a + 1]
        else 0.0
        for a in range(L - 1)
    ]
    angular = [(ang_sum[g - 1, : L - g] / n).tolist() for g in range(1, k + 1)]
    return {
        "rows": n,
        "block_influence": (1.0 - cos_sum[0] / n).tolist(),
        "angular_distance": {str(g): angular[g - 1] for g in range(1, k + 1)},
        "cka_adjacent": cka,
        "best_blocks": best_blocks(angular),
    }


def best_blocks(angular: list[list[float]]) -> dict[str, dict[str, Any]]:
    """Per n: the first hidden state ℓ* minimising d(ℓ, ℓ+n) and the blocks ℓ*..ℓ*+n−1 to drop."""
    out = {}
    for g, values in enumerate(angular, start=1):
        start = int(np.argmin(values))
        out[str(g)] = {
            "start": start,
            "blocks": list(range(start, start + g)),
            "distance": float(values[start]),
        }
    return out


def block_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(owner, attribute, ModuleList) of the model's transformer blocks: the one ModuleList with
    ``config.num_hidden_layers`` entries (BERT ``encoder.layer``, Llama ``model.layers``, GPT-2 ``h`` …)."""
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    found = []
    for owner_name, owner in model.named_modules():
        for attr, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                found.append((owner_name, owner, attr, child))
    if not found:
        raise LexpModelError(
            f"{type(model).__name__}: no list of {n} transformer blocks found; this family's blocks cannot be dropped"
        )
    _, owner, attr, blocks = min(found, key=lambda f: f[0].count("."))  # the outermost such list
    return owner, attr, blocks


def drop_blocks(model: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """Remove the given 0-based blocks in place (and shorten ``config.num_hidden_layers``)."""
    owner, attr, layers = block_list(model)
    drop = set(int(b) for b in blocks)
    if not drop or min(drop) < 0 or max(drop) >= len(layers):
        raise LexpInputError(f"blocks {sorted(drop)} are not among the model's {len(layers)} blocks")
    kept = [m for i, m in enumerate(layers) if i not in drop]
    setattr(owner, attr, torch.nn.ModuleList(kept))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, key):
            setattr(model.config, key, len(kept))
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        model.config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    for i, m in enumerate(kept):  # attention modules that index a cache by layer
        for sub in m.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    return model


@torch.inference_mode()
def perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> dict[str, float]:
    """Token-level perplexity of a causal LM over ``texts`` (one sequence per forward, no padding)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    if count == 0:
        raise LexpInputError("perplexity: no text of at least 2 tokens")
    return {"perplexity": float(np.exp(nll / count)), "nll": nll / count, "tokens": count}

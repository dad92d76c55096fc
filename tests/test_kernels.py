"""The compiled kernels (lexp.kernels) against the torch operations they replace, and their build."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lexp import kernels
from lexp.errors import LexpInputError
from lexp.probes import ElasticNetAdam, FusedHeads, LeanAdam, MultiHeadProbe, train_probes

needs_compiler = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")

#: overlapping subsets of 10 columns: per block products, shared blocks, a scattered head
SUBSETS = [np.arange(4), np.arange(4, 10), np.arange(10), np.array([7, 1, 5]), np.arange(10)[::-1].copy()]


def _data(n, n_features=10, n_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(size=(n, n_features)).astype(np.float32))
    y = torch.as_tensor(rng.integers(0, n_classes, n).astype(np.int64))
    return x, y


def _pair(n_classes=5, max_blocks=None, seed=3):
    """The same heads twice: with the kernels and with torch operations."""
    return (
        FusedHeads(SUBSETS, n_classes, seed, max_blocks, kernels=True),
        FusedHeads(SUBSETS, n_classes, seed, max_blocks, kernels=False),
    )


@needs_compiler
def test_the_library_builds_and_uses_torchs_threads():
    assert kernels.available(), kernels.unavailable_reason()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.threads() == 1  # one OpenMP runtime: torch's setting reaches the kernels
        torch.set_num_threads(2)
        assert kernels.threads() == 2
    finally:
        torch.set_num_threads(before)


@needs_compiler
@pytest.mark.parametrize("n", [45, 128])  # 45: not a multiple of the kernel's 32-row work items
@pytest.mark.parametrize("max_blocks", [None, 2])  # shared blocks, or one block per head
def test_cross_entropy_kernel_equals_torch(n, max_blocks):
    fast, slow = _pair(max_blocks=max_blocks)
    x, y = _data(n)
    losses = {}
    for penalty in (False, True):
        a = fast.loss_and_grad(x, y, l1=1e-3, l2=1e-3, regression=False, penalty=penalty)
        losses[penalty] = slow.loss_and_grad(x, y, l1=1e-3, l2=1e-3, regression=False, penalty=penalty)
        torch.testing.assert_close(a, losses[penalty], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.weight.grad, slow.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fast.bias.grad, slow.bias.grad, rtol=1e-5, atol=1e-7)
    # penalty=False is the data term alone: the difference is the penalty's value
    abs_sum, norm = slow.penalty_terms()
    assert abs_sum.min() > 0
    torch.testing.assert_close(losses[True] - losses[False], 1e-3 * abs_sum + 1e-3 * norm)


@needs_compiler
def test_cross_entropy_kernel_rejects_labels_outside_the_classes():
    fast, _ = _pair()
    x, y = _data(16)
    y[3] = 5
    with pytest.raises(LexpInputError, match=r"class ids must be in \[0, 5\)"):
        fast.loss_and_grad(x, y, l1=0.0, l2=0.0, regression=False)


def _train(heads, steps, n=40, lr=1e-2, l1=1e-3, l2=1e-3, optimizer="elasticnet"):
    """``steps`` Adam steps: ElasticNetAdam (penalty in the update) or LeanAdam on the full gradient."""
    opt = (
        ElasticNetAdam(heads, lr, l1=l1, l2=l2)
        if optimizer == "elasticnet"
        else LeanAdam(heads.parameters(), lr)
    )
    for step in range(steps):
        x, y = _data(n, seed=100 + step)
        heads.loss_and_grad(x, y, l1=l1, l2=l2, regression=False, penalty=optimizer != "elasticnet")
        if optimizer == "elasticnet":  # the penalty it reports is that of the current weights
            for ours, direct in zip(opt.penalty(), heads.penalty_terms(), strict=True):
                torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-7)
        opt.update()
    return opt


@needs_compiler
def test_elasticnet_adam_kernel_equals_torch_and_the_full_gradient_path():
    fast, slow = _pair()
    reference = FusedHeads(SUBSETS, 5, 3, kernels=False)
    _train(fast, 30)
    _train(slow, 30)
    _train(reference, 30, optimizer="lean")  # penalty in .grad, then plain Adam: the old path
    for other in (slow, reference):
        torch.testing.assert_close(fast.weight, other.weight, rtol=0, atol=2e-6)
        torch.testing.assert_close(fast.bias, other.bias, rtol=0, atol=2e-6)
    assert not torch.equal(fast.weight, FusedHeads(SUBSETS, 5, 3).weight)  # it did train


@needs_compiler
def test_elasticnet_adam_kernel_without_l1_and_with_a_zero_head():
    fast, slow = _pair()
    for heads in (fast, slow):
        with torch.no_grad():
            heads.set_head(1, torch.zeros(5, 6), torch.zeros(5))  # ‖W_h‖ = 0: subgradient 0, no NaN
        _train(heads, 5, l1=0.0)
    assert torch.isfinite(fast.weight).all() and fast.head(1)[0].abs().min() > 0
    # From an exactly uniform softmax, gradients that are zero up to rounding get Adam steps of
    # ±lr in either path: equal to well within one step (lr = 1e-2), not to float precision.
    torch.testing.assert_close(fast.weight, slow.weight, rtol=0, atol=1e-3)


@needs_compiler
def test_penalty_terms_are_recounted_after_the_weights_change_outside_the_kernel():
    heads, _ = _pair()
    opt = _train(heads, 3)
    with torch.no_grad():
        heads.set_head(0, torch.ones(5, 4), torch.zeros(5))
    abs_sum, norm = opt.penalty()
    assert abs_sum[0].item() == pytest.approx(20.0)
    assert norm[0].item() == pytest.approx(20.0**0.5)


@needs_compiler
def test_kernel_results_do_not_depend_on_the_number_of_threads():
    """Same inputs, 1 or 2 threads: bit-identical outputs (work items are summed in a fixed order)."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            heads = FusedHeads([np.arange(3000), np.arange(1000, 3000)], 7, 1, kernels=True)
            opt = ElasticNetAdam(heads, 1e-2, l1=1e-4, l2=1e-4, chunk=512)  # many chunks per segment
            gen = torch.Generator().manual_seed(5)
            for _ in range(4):  # fixed data gradients: only the Adam kernel runs with `threads`
                heads.weight.grad = torch.randn(heads.weight.shape, generator=gen)
                heads.bias.grad = torch.randn(heads.bias.shape, generator=gen)
                opt.update()
            products = torch.randn(heads._out_index.numel(), 100, generator=gen)
            y = torch.randint(0, 7, (100,), generator=gen)
            out = kernels.xent_heads(products, heads.bias.detach(), y, heads._slot_table)
            results.append([heads.weight.detach().clone(), *opt.penalty(), *out])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_probes_train_the_same_without_the_kernels(monkeypatch):
    """End to end through Lightning: the torch path (no compiler, LEXP_KERNELS=0) gives the kernels'
    probes."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)
    from test_probes import QUIET, ArrayDataModule

    subsets = {f"s{i}": cols for i, cols in enumerate(SUBSETS)}
    cfg = {"epochs": 2, "lr": 1e-2, "l1": 1e-4, "l2": 1e-4, "seed": 0}
    runs = []
    for available in (True, False):
        monkeypatch.setattr(kernels, "available", lambda available=available: available)
        dm = ArrayDataModule((x[:240], y[:240]), (x[240:], y[240:]), n_classes=3)
        runs.append(train_probes(dm, subsets, probe_cfg=cfg, trainer_kwargs=QUIET))
        module = MultiHeadProbe(subsets, 10, 3)
        assert module.fused.use_kernels() is available
    for name in subsets:
        np.testing.assert_allclose(runs[0][name]["weights"], runs[1][name]["weights"], atol=1e-5, rtol=0)
        assert runs[0][name]["dev"]["accuracy"] == pytest.approx(runs[1][name]["dev"]["accuracy"])


def test_switched_off_or_unbuildable_library_falls_back_with_a_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LEXP_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("LEXP_KERNELS", "0")
    assert kernels._load() is None
    assert "LEXP_KERNELS=0" in kernels.unavailable_reason()
    monkeypatch.setenv("LEXP_KERNELS", "1")
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    monkeypatch.setattr(kernels, "_compiler", lambda: "/bin/false")
    assert kernels._load() is None
    assert "could not build" in kernels.unavailable_reason()
    assert not list(tmp_path.glob("*.so"))  # no half-built library left behind
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="lexp.kernels"):
        assert kernels.library() is None
    assert "probes use torch operations" in caplog.text


@needs_compiler
def test_a_fresh_cache_directory_gets_a_library_named_after_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LEXP_KERNEL_DIR", str(tmp_path / "k"))
    lib = kernels._load()
    assert lib is not None and lib.lexp_kernel_threads() >= 1
    built = list((tmp_path / "k").glob("lexp_kernels-*.so"))
    assert len(built) == 1
    assert not list((tmp_path / "k").glob(".build-*"))  # the build directory is removed
    mtime = built[0].stat().st_mtime_ns
    assert kernels._load() is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


@needs_compiler
def test_bfloat16_products_agree_between_paths_and_stay_near_float32():
    fast, slow = _pair()
    x, y = _data(64)
    exact = slow.loss_and_grad(x, y, l1=0.0, l2=0.0, regression=False, penalty=False)
    exact_grad = slow.weight.grad.clone()
    a = fast.loss_and_grad(x, y, l1=0.0, l2=0.0, regression=False, penalty=False, dtype=torch.bfloat16)
    b = slow.loss_and_grad(x, y, l1=0.0, l2=0.0, regression=False, penalty=False, dtype=torch.bfloat16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same roundings, then float32 maths
    torch.testing.assert_close(fast.weight.grad, slow.weight.grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(a, exact, rtol=1e-2, atol=0)  # bfloat16: ~3 significant digits
    torch.testing.assert_close(fast.weight.grad, exact_grad, rtol=5e-2, atol=2e-3)
    assert not torch.equal(fast.weight.grad, exact_grad)  # the products really were bfloat16


@needs_compiler
def test_the_bfloat16_weight_copy_follows_every_change_of_the_weight():
    heads = FusedHeads(SUBSETS, 5, 3, kernels=True)
    opt = ElasticNetAdam(heads, 1e-2, l1=1e-3, l2=1e-3)
    for step in range(3):
        x, y = _data(32, seed=step)
        heads.loss_and_grad(x, y, l1=1e-3, l2=1e-3, regression=False, penalty=False, dtype=torch.bfloat16)
        opt.update()  # refreshes the copy in its pass (the kernel rounds to nearest even, as torch)
        assert torch.equal(heads.low_weight(), heads.weight.detach().to(torch.bfloat16))
        assert heads._low_weight(torch.bfloat16) is heads.low_weight()
    with torch.no_grad():
        heads.set_head(0, torch.full((5, 4), 0.5), torch.zeros(5))  # a change outside the kernel
    assert torch.equal(heads._low_weight(torch.bfloat16), heads.weight.detach().to(torch.bfloat16))
    lean = LeanAdam(heads.parameters(), 1e-2)  # torch's fused Adam: no in-place write autograd sees
    heads.loss_and_grad(x, y, l1=1e-3, l2=1e-3, regression=False)
    lean.update()
    assert torch.equal(heads._low_weight(torch.bfloat16), heads.weight.detach().to(torch.bfloat16))


def test_bf16_mixed_probes_train_like_float32():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 10)) * 2
    y = rng.integers(0, 3, 400)
    x = (centres[y] + rng.normal(size=(400, 10))).astype(np.float32)
    from test_probes import QUIET, ArrayDataModule

    subsets = {f"s{i}": cols for i, cols in enumerate(SUBSETS)}
    cfg = {"epochs": 3, "lr": 1e-2, "l1": 1e-4, "l2": 1e-4, "seed": 0}
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        dm = ArrayDataModule((x[:320], y[:320]), (x[320:], y[320:]), n_classes=3)
        runs[precision] = train_probes(
            dm, subsets, probe_cfg=cfg, trainer_kwargs={**QUIET, "precision": precision}
        )
    for name in subsets:
        full, half = runs["32-true"][name], runs["bf16-mixed"][name]
        assert abs(full["dev"]["accuracy"] - half["dev"]["accuracy"]) <= 0.025  # at most 2 of 80 rows
        np.testing.assert_allclose(half["weights"], full["weights"], atol=0.05, rtol=0)
        assert not np.array_equal(half["weights"], full["weights"])

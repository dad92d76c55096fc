"""The probes on every device (the ``device`` fixture: cpu always, cuda where torch sees a GPU).

Each test compares the device against a reference computed independently: the autograd
ElasticNetProbe, torch.optim.Adam, or the same probe trained on the CPU. On a CPU-only machine the
cuda half is skipped and the cpu half still checks the device plumbing (buffers, moves, kwargs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lexp.datamodules import ActivationDataModule
from lexp.device import trainer_device_kwargs
from lexp.errors import LexpInputError
from lexp.probes import ElasticNetAdam, ElasticNetProbe, FusedHeads, LeanAdam, MultiHeadProbe, train_probes
from lexp.store import StoreWriter

#: overlapping subsets of 10 columns: shared blocks, a scattered head, one head on everything
SUBSETS = [np.arange(4), np.arange(4, 10), np.arange(10), np.array([7, 1, 5]), np.arange(10)[::-1].copy()]
QUIET = {"enable_progress_bar": False}


def _data(n, n_features=10, n_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(size=(n, n_features)).astype(np.float32))
    y = torch.as_tensor(rng.integers(0, n_classes, n).astype(np.int64))
    return x, y


def _all_on(module: torch.nn.Module, device: torch.device) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device.type == device.type, name


def test_fused_heads_move_with_their_buffers(device):
    """Every index tensor is a buffer that moves; the per-block views follow; back on the CPU the
    module gives the same outputs."""
    heads = FusedHeads(SUBSETS, 5, seed=3)
    x, _ = _data(16)
    before = heads(x)
    heads.to(device)
    _all_on(heads, device)
    assert all(c.device.type == device.type for c in heads._cols if isinstance(c, torch.Tensor))
    assert all(p.device.type == device.type for ps in heads._positions for p in ps)
    on_device = heads(x.to(device))
    assert on_device.device.type == device.type
    torch.testing.assert_close(on_device.cpu(), before, rtol=1e-5, atol=1e-6)
    weight, bias = heads.head(3)
    assert weight.device.type == device.type and weight.shape == (5, 3)
    heads.to("cpu")
    torch.testing.assert_close(heads(x), before)


@pytest.mark.parametrize("regression", [False, True])
def test_fused_loss_and_grad_equal_autograd_on_the_device(device, regression):
    """On the device, each head's fused loss and gradients equal the autograd ElasticNetProbe's
    there (the torch path on CUDA; the compiled kernels, when built, on the CPU)."""
    n_outputs = 1 if regression else 5
    x, y = _data(40, seed=1)
    if regression:
        y = x[:, 0] - 0.5 * x[:, 3]
    x, y = x.to(device), y.to(device)
    heads = FusedHeads(SUBSETS, n_outputs, seed=4).to(device)
    losses = heads.loss_and_grad(x, y, l1=1e-3, l2=1e-3, regression=regression)
    assert losses.device.type == device.type and heads.weight.grad.device.type == device.type
    for h, cols in enumerate(SUBSETS):
        single = ElasticNetProbe(
            10, 0 if regression else n_outputs, columns=cols, l1=1e-3, l2=1e-3, seed=4, regression=regression
        ).to(device)
        loss = single.loss(x, y)
        loss.backward()
        weight_grad, bias_grad = heads.head(h, grad=True)
        torch.testing.assert_close(losses[h], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight_grad, single.linear.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bias_grad, single.linear.bias.grad, rtol=1e-4, atol=1e-6)


def test_multihead_probe_forward_on_the_device(device):
    probe = MultiHeadProbe({f"h{i}": c for i, c in enumerate(SUBSETS)}, 10, 5, seed=2)
    x, _ = _data(12, seed=2)
    expected = probe(x)
    probe.to(device)
    _all_on(probe, device)
    torch.testing.assert_close(probe(x.to(device)).cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["lean", "elasticnet"])
def test_optimizers_equal_torch_adam_on_the_device(device, optimizer):
    """LeanAdam (its step counter on the parameter's device, as fused Adam wants on CUDA) and
    ElasticNetAdam (l1 = l2 = 0: plain Adam) follow torch.optim.Adam on the device."""
    torch.manual_seed(0)
    if optimizer == "lean":
        ours = [
            torch.randn(30, 7, device=device, requires_grad=True),
            torch.randn(7, device=device, requires_grad=True),
        ]
        opt = LeanAdam(ours, lr=1e-2)
    else:
        heads = FusedHeads(SUBSETS, 5, seed=1).to(device)
        ours = [heads.weight, heads.bias]
        opt = ElasticNetAdam(heads, lr=1e-2, l1=0.0, l2=0.0)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    reference = torch.optim.Adam(theirs, lr=1e-2)
    for step in range(12):
        for p, q in zip(ours, theirs, strict=True):
            g = torch.randn(p.shape, device=device) * (step + 1)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 12


def _store(path, x, y):
    with StoreWriter(
        path, n_rows=len(y), n_layers=2, hidden=5, dtype="float16", manifest={"label_vocab": list("abcde")}
    ) as writer:
        writer.write_rows(0, x)
        return writer.finish(y)


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("reference", [False, True])
def test_probe_trained_on_the_device_equals_the_cpu_probe(device, tmp_path, reference, resident):
    """train_probes with the Trainer on the device (lexp.device.trainer_device_kwargs), the rows
    streamed or held on the device: the same weights and scores as streamed on the CPU, within float
    tolerance (same seed, same batches)."""
    if device.type == "cpu" and not resident:
        pytest.skip("that is the CPU reference run itself")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 10)) * 2

    def split(n, seed):
        r = np.random.default_rng(seed)
        y = r.integers(0, 5, n)
        return (centres[y] + r.normal(size=(n, 10))).astype(np.float32), y

    paths = [_store(tmp_path / name, *split(n, s)) for name, n, s in (("train", 480, 1), ("dev", 120, 2))]
    subsets = None if reference else {f"h{i}": c for i, c in enumerate(SUBSETS)}
    cfg = {"epochs": 2, "lr": 1e-2, "l1": 1e-4, "l2": 1e-4, "seed": 5}
    results = {}
    for where, held in ((torch.device("cpu"), False), (device, resident)):
        dm = ActivationDataModule(paths[0], paths[1], batch_size=32, seed=7, read_steps=3, resident=held)
        kwargs = {**QUIET, **trainer_device_kwargs(where)}
        results[held] = train_probes(dm, subsets, probe_cfg=cfg, trainer_kwargs=kwargs, reference=reference)
    cpu, dev = results[False], results[resident]
    for name, result in cpu.items():
        np.testing.assert_allclose(dev[name]["weights"], result["weights"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dev[name]["bias"], result["bias"], rtol=1e-4, atol=1e-5)
        assert dev[name]["dev"]["accuracy"] == pytest.approx(result["dev"]["accuracy"], abs=1 / 120)
        assert dev[name]["best_epoch"] == result["best_epoch"]


def test_train_labels_outside_the_classes_raise_on_the_device(device, tmp_path):
    """A class id >= n_classes in a streamed train batch is an error on every device (on CUDA it
    never reaches an indexing kernel: clamped, flagged, and reported at the batch's one sync)."""
    x, y = np.random.default_rng(0).normal(size=(96, 10)).astype(np.float32), np.arange(96) % 5
    y[40] = 7
    path = _store(tmp_path / "train", x, y)
    dm = ActivationDataModule(path, batch_size=32, read_steps=3, resident=False)
    kwargs = {**QUIET, **trainer_device_kwargs(device)}
    with pytest.raises(LexpInputError, match="label id 7 is outside the 5 train classes"):
        train_probes(dm, None, probe_cfg={"epochs": 1, "select_on_dev": False}, trainer_kwargs=kwargs)

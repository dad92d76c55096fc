"""ElasticNet probes (Section 3.2 of the paper) as LightningModules, and one pass that trains many.

The probe is a logistic regression, one ``nn.Linear`` from neurons to classes, trained with

    loss = mean cross-entropy + l1 · Σ|W| + l2 · ‖W‖₂

where ‖W‖₂ is the *un-squared* Frobenius norm of the weight matrix (as in the published code,
NeuroX ``l2_penalty``); the bias is never penalised. Adam, lr 1e-3, 10 epochs, batch 128,
l1 = l2 = 1e-5. STS-B is a regression: one output, MSE instead of cross-entropy, same penalties.

Two modules share one implementation of the loss, the metrics and model selection on dev:

* :class:`ElasticNetProbe` — the reference: one ``nn.Linear`` on all (or given) columns.
* :class:`MultiHeadProbe` — many probes on named column subsets (per layer, layers 0..k, the
  oracle, top-n neurons ...) trained in **one pass over the activations**. The heads share no
  parameters and the total loss is the *sum* of the per-head losses, so every head receives exactly
  the gradients it would receive alone; Adam is elementwise, so one Adam over all heads equals one
  Adam per head. Each head is initialised from ``seed`` alone, exactly like an
  :class:`ElasticNetProbe` of the same width, hence head ``h`` equals
  ``ElasticNetProbe(columns=subsets[h], seed=seed)`` trained on the same batches.

:func:`train_probes` is the shell: it runs ``Trainer.fit`` (dev evaluated after every epoch, the best
epoch kept in memory per head), ``Trainer.test``, and returns plain numbers and numpy arrays.

Where things are (a reader's map):

==================  ==========================================================================
``loss.py``         the maths: ElasticNet penalty, data loss, a head's initialisation, column checks
``fused.py``        :class:`FusedHeads`: H heads as blocks of shared columns, hand-written gradients
``heads.py``        :class:`HeadSpec` (a head's columns, seed, target) and :class:`Variants` (seeds
                    and control-task heads in the one pass; mean ± std and selectivity)
``optim.py``        :class:`LeanAdam` (torch's fused Adam) and :class:`ElasticNetAdam` (+ penalty)
``metrics.py``      :class:`ConfusionCounts` of many heads at once, :func:`classification_scores`
``modules.py``      the LightningModules and the one device-neutral training step they share
``train.py``        :func:`train_probes`, the Trainer it builds, :func:`predict`
==================  ==========================================================================

Everything runs on the device the Trainer puts the module on: index tensors are buffers that move
with it, and every tensor is created on the weights' device. The compiled kernels of
:mod:`lexp.kernels` are a CPU accelerator; on CUDA, torch's operations (and fused Adam) run. With
:class:`lexp.datamodules.ActivationDataModule` the train split can live on the device
(``probe.resident``), and a whole epoch is then one Lightning batch.

Classification labels of dev/test rows may be ids ``>= n_classes`` (labels unseen in train, see
``TaskData.encode_labels``). A probe cannot predict them, so they count as errors: accuracy is
``mean(pred == y)`` over *all* rows, and macro-F1 averages over the train classes with such rows
counted as false positives of whatever class was predicted.
"""

from __future__ import annotations

from lexp.probes.fused import FusedHeads
from lexp.probes.fused import _blocks as _blocks
from lexp.probes.heads import CONTROL_TARGET, HeadSpec, Variants, as_spec, mean_std
from lexp.probes.loss import _check_columns as _check_columns
from lexp.probes.loss import _data_loss as _data_loss
from lexp.probes.loss import elasticnet_penalty, init_head_
from lexp.probes.metrics import ConfusionCounts, classification_scores
from lexp.probes.modules import ALL_COLUMNS, ElasticNetProbe, MultiHeadProbe
from lexp.probes.modules import _ProbeModule as _ProbeModule
from lexp.probes.optim import ElasticNetAdam, LeanAdam
from lexp.probes.train import PROBE_DEFAULTS, predict, train_probes
from lexp.probes.train import _settings as _settings
from lexp.probes.train import _trainer as _trainer

__all__ = [
    "ALL_COLUMNS",
    "CONTROL_TARGET",
    "HeadSpec",
    "Variants",
    "as_spec",
    "mean_std",
    "ConfusionCounts",
    "ElasticNetProbe",
    "FusedHeads",
    "ElasticNetAdam",
    "LeanAdam",
    "MultiHeadProbe",
    "PROBE_DEFAULTS",
    "classification_scores",
    "elasticnet_penalty",
    "init_head_",
    "predict",
    "train_probes",
]

"""Skip-connection homotopy (seed 000 §4): train with skips, finish without them.

Each residual join of a torch model becomes

    join_t(F, S) = (1 − t)·F(x) + t·S(x),

where F is the residual branch, S the shortcut (the block input, or a projection of it) and t a non-trainable
buffer, shared by every join or one per join. t = 0.5 is the usual residual network up to a factor 1/2; t = 0 is a
plain feed-forward network. Annealing t to 0 during training (the paper's per-epoch lists, or linear, cosine, or a
step down each time validation accuracy passes a threshold) gives a model whose skips can be deleted after training:
exported at t = 0 each join reads `Mul(S, 0)`, which the `remove-skip` pass of cnnc deletes together with the
projection that fed only it (measured: 22 % faster ResNet-34, 46 % faster dense-skip 6-layer CNN, in the paper).

Note on the paper's notation: its Eq. (66) writes t·x(i−1) + (1 − t)·x(j) but then says t = 0 removes the skips;
cnnc uses the convention the text means (ARCHITECTURE.md): t weighs the shortcut, so t = 0 has no skip.

Activations (`activations`: ActivationHomotopy) anneal the same way, t·σ(x) + (1 − t)·x with t → 0, so that the
convs around each annealed activation merge into one (`pad_once` makes that exact at the borders; `plan` chooses the
sites where the merged conv is cheaper). Both homotopies compose on one model under one `HomotopyCallback`.

The package: `join` (HomotopyJoin, Residual), `fx_joins` (which adds of a torch.fx graph are residual joins: the
rule of `cnnc.ir.residual_joins`, shared with `cnnc analyze`), `wrap` (SkipHomotopy: wrap, set t, export) and
`schedules` (t over training, HomotopyCallback).

Usage with any training loop:

    homotopy = SkipHomotopy.wrap(model, t=0.9)                  # homotopy.model is the model to train
    callback = HomotopyCallback(homotopy, ListSchedule(PAPER_SCHEDULE_FROM_0_9))
    for epoch in range(10):
        callback.on_epoch_start(epoch)                           # or callback.on_step(...) per batch
        train_one_epoch(homotopy.model)
        callback.on_validation_end(epoch, accuracy)              # used by AccuracyStepSchedule
    onnx_model = homotopy.export(example_input, t=0.0)           # t baked in as a constant
"""

from cnnc.homotopy.activations import ActivationHomotopy, ActivationSite
from cnnc.homotopy.fx_joins import JoinMatch, find_joins
from cnnc.homotopy.join import HomotopyJoin, Residual
from cnnc.homotopy.pad_once import ChainLink, PadChange
from cnnc.homotopy.plan import Plan, Segment, plan
from cnnc.homotopy.schedules import (
    PAPER_SCHEDULE_FROM_0_5,
    PAPER_SCHEDULE_FROM_0_9,
    AccuracyStepSchedule,
    CosineSchedule,
    Homotopy,
    HomotopyCallback,
    HomotopySchedule,
    LinearSchedule,
    ListSchedule,
)
from cnnc.homotopy.wrap import SkipHomotopy

__all__ = [
    "PAPER_SCHEDULE_FROM_0_5",
    "PAPER_SCHEDULE_FROM_0_9",
    "AccuracyStepSchedule",
    "ActivationHomotopy",
    "ActivationSite",
    "ChainLink",
    "CosineSchedule",
    "Homotopy",
    "HomotopyCallback",
    "HomotopyJoin",
    "HomotopySchedule",
    "JoinMatch",
    "LinearSchedule",
    "ListSchedule",
    "PadChange",
    "Plan",
    "Residual",
    "Segment",
    "SkipHomotopy",
    "find_joins",
    "plan",
]

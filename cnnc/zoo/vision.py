"""The networks people ship: torchvision and timm classifiers with seeded random weights and calibrated BatchNorm.

No weights can be downloaded, and none are needed: bench/zoo.py and the tests compare a model with its own compiled
form, so any weights do, as long as the network is conditioned like a trained one: activations in a realistic range
and rounding errors that do not grow block after block. Each model is built under a forked, seeded RNG, then
`cnnc.zoo.branch_damping.calibrate_damped` draws γ, β, *measures* every BN's running statistics in eval mode on one
seeded N(0, 1) batch of `CALIBRATION_BATCH` images at the model's input size, and damps each residual branch to
0.2 of its skip (NF-Nets' α), the same rule for every network (see there why: with branches as large as their skips and
statistics measured in training mode, MobileNetV2 and MobileOne-S0 were chaotic and their float16 exports drifted
by 3-16 %). Float64 forward, weights rounded to float16, max|Δy|/max|y| on a U[0, 1) / an N(0, 1) batch, before ->
after: MobileNetV2 at 32 px 3.3e-2 / 9.6e-2 -> 9.1e-3 / 1.2e-2, at 64 px -> 3.8e-3 / 6.1e-3; MobileOne-S0 at 32 px
4.8e-2 / 1.2e-2 -> 6.6e-4 / 1.7e-2, at 64 px -> 3.6e-4 / 3.7e-3; ResNet-18 at 32 px 2.8e-3 / 7.5e-3 -> 1.7e-3 /
1.7e-3. The statistics depend on the input size: `size` is part of a model's identity (and of the export cache key
in cnnc.zoo.exports, with `CALIBRATION`, the rule's version).

torchvision and timm are optional (the `zoo` extra: `pip install 'cnnc[zoo]'`), imported only when a zoo model is
built, so that `cnnc` itself never pays their import time (about 5 s).

The import trap, and how `vision_libraries` gets around it. The torchvision 0.28 wheel on PyPI is a CUDA build. Next
to the CPU build of torch its compiled extension (`torchvision/_C.so`) does not load, which torchvision tolerates,
but `import torchvision` then registers fake (meta) kernels for `torchvision::nms` and `torchvision::qnms`
unconditionally and fails with "operator torchvision::nms does not exist"; timm imports torchvision, so it fails too.
The classification models use none of the compiled ops. So, before the import, the extension is loaded the way
torchvision loads it; only if that fails are the two schemas defined from Python (no kernel: calling them raises),
which is all the fake-kernel registration needs. When the extension loads, nothing is defined: a Python definition
would clash with the extension's own registration of the `torchvision` namespace.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from cnnc.errors import UsageError
from cnnc.threads import compile_threads
from cnnc.zoo.branch_damping import calibrate_damped

INSTALL_HINT = "pip install 'cnnc[zoo]'"
# BN statistics are measured on one batch of this size: on the 1x1 maps of a small input a channel's statistics are
# over the batch alone, and 8 samples left MobileOne-S0 at 16 px 40x more sensitive to float16 rounding than 32 do.
CALIBRATION_BATCH = 32
CALIBRATION = "damped1"  # the calibration rule's version, in the export cache key: bump it when the rule changes

# The schemas torchvision's _meta_registrations needs to exist when its compiled extension did not load.
_COMPILED_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Module-level reference: a torch.library.Library unregisters its definitions when it is garbage-collected.
_schema_library: torch.library.Library | None = None


@dataclass(frozen=True)
class ZooModel:
    """One zoo network: `library` is "torchvision" or "timm"; `options` are constructor keyword arguments.
    `reparameterizable`: timm builds it with train-time branches, and `timm.utils.reparameterize_model` merges them
    (the reference for cnnc's own merge)."""

    name: str
    library: str
    description: str
    options: dict = field(default_factory=dict)
    reparameterizable: bool = False


ZOO: dict[str, ZooModel] = {
    model.name: model for model in (
        ZooModel("resnet18", "torchvision", "ResNet-18: BasicBlocks, projection skips"),
        ZooModel("resnet50", "torchvision", "ResNet-50: Bottlenecks"),
        ZooModel("mobilenet_v2", "torchvision", "MobileNetV2: inverted residuals, ReLU6"),
        ZooModel("mobilenet_v3_small", "torchvision", "MobileNetV3-Small: hard-swish, squeeze-excitation"),
        ZooModel("efficientnet_b0", "torchvision", "EfficientNet-B0: MBConv, SiLU, squeeze-excitation"),
        ZooModel("regnet_y_400mf", "torchvision", "RegNetY-400MF: grouped convs, squeeze-excitation"),
        ZooModel("densenet121", "torchvision", "DenseNet-121: concatenations, BN after Concat"),
        ZooModel("squeezenet1_1", "torchvision", "SqueezeNet 1.1: fire modules, no BN"),
        ZooModel("shufflenet_v2_x1_0", "torchvision", "ShuffleNetV2 1.0: channel shuffle (Reshape/Transpose)"),
        ZooModel("mnasnet0_5", "torchvision", "MNASNet 0.5"),
        ZooModel("convnext_tiny", "torchvision", "ConvNeXt-Tiny: 7x7 depthwise, LayerNorm, GELU, layer scale"),
        ZooModel("vgg11_bn", "torchvision", "VGG-11 with BN: plain convs, a 25088x4096 classifier"),
        ZooModel("googlenet", "torchvision", "GoogLeNet: inception branches",
                 {"aux_logits": False, "init_weights": False}),  # init_weights=False: scipy's init is slow
        ZooModel("repvgg_a0", "timm", "RepVGG-A0 with train-time branches (3x3, 1x1, identity BN)",
                 reparameterizable=True),
        ZooModel("mobileone_s0", "timm", "MobileOne-S0 with train-time branches (k over-parameterised convs)",
                 reparameterizable=True),
        ZooModel("ghostnet_100", "timm", "GhostNet 1.0: ghost modules (cheap depthwise features + Concat)"),
    )
}


def _compiled_extension_loads(package_folder: Path) -> bool:
    """Load torchvision's compiled extension as torchvision/extension.py does; False when it does not load."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = package_folder / f"_C{suffix}"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
            except OSError:  # a CUDA build beside a CPU torch: undefined symbols
                return False
            return True
    return False


def _define_missing_compiled_ops() -> None:
    global _schema_library
    if _schema_library is None:
        _schema_library = torch.library.Library("torchvision", "DEF")
        for schema in _COMPILED_OP_SCHEMAS:
            _schema_library.define(schema)


def vision_libraries() -> tuple[ModuleType, ModuleType]:
    """(torchvision, timm), imported around the import trap described above; UsageError when either is missing."""
    # find_spec locates the package without importing it, so the extension can be tried before torchvision runs.
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the model zoo needs torchvision and timm, which are not installed: {INSTALL_HINT}")
    if not hasattr(torch.ops.torchvision, "nms") and not _compiled_extension_loads(
            Path(next(iter(spec.submodule_search_locations)))):
        _define_missing_compiled_ops()
    try:
        import timm  # optional dependency (the zoo extra); it imports torchvision too, so after the shim
        import torchvision  # optional dependency (the zoo extra)
    except ImportError as error:
        raise UsageError(f"the model zoo needs torchvision and timm ({error}): {INSTALL_HINT}") from None
    return torchvision, timm


def _entry(name: str) -> ZooModel:
    if name not in ZOO:
        raise UsageError(f"unknown zoo model '{name}'; choose one of {', '.join(ZOO)}")
    return ZOO[name]


def build_zoo_model(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """The zoo model `name` in eval mode: weights from torch's default initialisation under `seed`, BN statistics
    calibrated and residual branches damped at `size` x `size` (3 channels; `calibrate_damped`). The global RNG is
    left as it was."""
    entry = _entry(name)
    if size < 1:
        raise UsageError(f"the input size must be positive, got {size}")
    torchvision, timm = vision_libraries()
    # compile_threads: torch's pool as cnnc.compile sizes it (physical cores; CNNC_THREADS=1 on a busy machine): under
    # contention a 2-thread pool made one calibration of MobileNetV3-Small 20x slower (9 s against 0.4 s at 1 thread).
    with compile_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if entry.library == "torchvision":
            module = getattr(torchvision.models, name)(weights=None, **entry.options)
        else:
            module = timm.create_model(name, pretrained=False, **entry.options)
        calibrate_damped(module, (CALIBRATION_BATCH, 3, size, size), seed)
    return module.eval()


def timm_reparameterized(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """`build_zoo_model(name)` with its train-time branches merged by timm's own `reparameterize_model`: what cnnc's
    merge of MobileOne / RepVGG is compared with."""
    if not _entry(name).reparameterizable:
        raise UsageError(f"'{name}' has no train-time branches to reparameterise; choose one of "
                         f"{', '.join(n for n, m in ZOO.items() if m.reparameterizable)}")
    _, timm = vision_libraries()
    return timm.utils.reparameterize_model(build_zoo_model(name, size, seed)).eval()


def example_input(size: int = 64, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded N(0, 1) image batch of shape (batch, 3, size, size)."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)

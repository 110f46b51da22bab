"""The model library: ResNet backbones with auxiliary branches (SSAL, GapCat, DKS, DS),
their losses, prediction rules, the class-grouping algorithm, and ``serving`` (the model with its
prediction rules applied, as MLflow serves it).  Pure PyTorch.

Contract (used by the training engine)::

    model = ssal_models.build_model(arch, method, num_classes, **options)
    out = model(x)                     # OrderedDict: "main" first, then "ssal.0", "dks.1", ...
    m = model.method                   # nn.Module submodule: buffers (SSAL's class->group
                                       # indices), no parameters except an attached +LC head
    total, parts = m.loss(out, targets)        # parts: unweighted, detached named terms
    rules = m.predict(out)             # {rule: (N, C) float32 log-probabilities}
    extra = m.extra_metrics(out, targets)      # {name: (N,) bool per-sample correctness}
    m.name                             # "baseline" | "ssal" | "gapcat" | "dks" | "ds" | "maxl"
    ssal_models.count_parameters(model)         # {"backbone", one per branch, "total"}

Archs: resnet18, resnet34, resnet50, resnet152 (torchvision, random init).  Every method
accepts ``blurpool``, ``zero_init_residual`` and the capacity options ``width_multiplier``,
``stem_convs``, ``stem_conv_width`` (``ssal_models.backbones``); method options are documented in
``ssal_models.ssal`` (``ssal``), ``.gapcat``, ``.dks`` (``dks`` and ``ds``), ``.baseline``,
``.maxl`` (``maxl``). A new method registers a builder with
:func:`ssal_models.base.register_method` in its own module, imported below (see ``ssal_models/base.py``).
"""
from . import baseline, dks, gapcat, grouping, maxl, ssal  # noqa: F401  (importing registers the methods)

maxl.register()  # explicit (idempotent): see ssal_models/maxl.py
from .base import Method, register_method
from .model import BranchedResNet, available_archs, available_methods, build_model, count_parameters
from .ssal import LinearCombinationHead, fit_linear_combination

__all__ = [
    "BranchedResNet", "LinearCombinationHead", "Method", "available_archs", "available_methods", "build_model",
    "count_parameters", "fit_linear_combination", "grouping", "register_method",
]

"""GapCat (``GapCatNoSSAL`` in the SSAL paper, §4.3): SSAL's branch layout without its loss.

Each branch is an :class:`ssal_models.ssal.SSALHead` without its group classifier: its pooled
``2w`` features are concatenated to the backbone's pooled features, and the (widened) main
classifier reads the concatenation.  The loss is cross-entropy on the main head only, so the
branches add capacity but no grouping objective: it separates "more weights" from "the SSAL
objective".  ``model(x)`` returns ``{"main": logits}`` alone (the branches have no outputs of
their own); ``count_parameters`` still lists every branch (``gapcat.i``).

Options: ``head`` (``light`` | ``authors``), ``stages`` and ``widths`` as for SSAL (default
three light branches after layer1, layer2, layer3 with widths 64 / 128 / 256; the authors'
heads give 1496 features each).  ``groupings`` is accepted so that a config can switch
between ``ssal`` and ``gapcat`` unchanged: it only sets the number of branches (and the
default stages), as it does for SSAL.
"""
from __future__ import annotations

from typing import Any, Dict

from .backbones import BackboneInfo
from .base import Method, MethodBuild, check_options, register_method
from .ssal import build_heads, parse_layout


class GapCatMethod(Method):
    name = "gapcat"
    concat_branch_features = True  # the model feeds [pooled, branch features...] to the main classifier


@register_method("gapcat")
def build_gapcat(info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    check_options("gapcat", options, ["groupings", "stages", "widths", "head"])
    head, stages, widths, groupings = parse_layout("gapcat", info, options)
    if groupings is not None:
        for index, grouping in enumerate(groupings):
            if grouping.size != num_classes:
                raise ValueError(f"gapcat: groupings[{index}] has {grouping.size} entries but "
                                 f"num_classes = {num_classes}")
    branches = build_heads(info, "gapcat", head, stages, widths, [None] * len(stages))
    # GapCat's branches feed the main head; the method itself has no branch outputs
    method = GapCatMethod(num_classes, [])
    return MethodBuild(method, branches, main_extra_features=sum(b.module.feature_dim for b in branches))

"""The plain backbone: the main classifier and its cross-entropy, no branches (option-free
apart from the backbone's ``blurpool`` / ``zero_init_residual`` and capacity options)."""
from __future__ import annotations

from typing import Any, Dict

from .backbones import BackboneInfo
from .base import Method, MethodBuild, check_options, register_method


class BaselineMethod(Method):
    name = "baseline"


@register_method("baseline")
def build_baseline(info: BackboneInfo, num_classes: int, options: Dict[str, Any]) -> MethodBuild:
    check_options("baseline", options, [])
    return MethodBuild(BaselineMethod(num_classes))

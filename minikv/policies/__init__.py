"""Policy registry: names -> classes. `get_policy(name, budget=..., **options)` builds one; unknown names are errors."""
from __future__ import annotations

from .base import Policy
from .full import FullCache
from .h2o import H2O
from .snapkv import PyramidKV, SnapKV
from .streaming import Streaming

REGISTRY: dict[str, type[Policy]] = {
    "full": FullCache,
    "streaming": Streaming,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
}


def register(cls: type[Policy]) -> type[Policy]:
    REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(REGISTRY)


def get_policy(name: str, budget=None, **options) -> Policy:
    """Build the policy called `name`. Raises ValueError listing the known names for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    try:
        return REGISTRY[name](budget=budget, **options)
    except TypeError as e:
        raise ValueError(f"bad options for policy {name!r}: {e}") from None

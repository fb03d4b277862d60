"""Policy registry: names -> classes. `get_policy(name, budget=..., **options)` builds one; unknown names are errors."""
from __future__ import annotations

from minikv.policies.adakv import AdaH2O, AdaPyramidKV, AdaSnapKV
from minikv.policies.base import Policy, policy_options
from minikv.policies.corm import CORM
from minikv.policies.d2o import D2O
from minikv.policies.full import FullCache
from minikv.policies.h2o import H2O
from minikv.policies.snapkv import PyramidKV, SnapKV
from minikv.policies.streaming import Streaming
from minikv.errors import BadInput

# name -> class, each class under its own `name` (the order `bench` and error messages list them in)
REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in (FullCache, CORM, Streaming, H2O, SnapKV, PyramidKV,
                                                                AdaSnapKV, AdaPyramidKV, AdaH2O, D2O)}

def policy_names() -> list[str]:
    return sorted(REGISTRY)

def get_policy(name: str, budget=None, **options) -> Policy:
    """Build the policy called `name`. Raises ValueError (BadInput) for an unknown name or option, or a bad value."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise BadInput(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    known = policy_options(REGISTRY[name])
    unknown = [k for k in options if k not in known]
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise BadInput(f"policy {name!r} has no option {unknown[0]!r}; its options (with defaults): {valid}")
    return REGISTRY[name](budget=budget, **options)

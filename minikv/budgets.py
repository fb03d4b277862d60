"""Budget parsing and allocation across layers. Allocation is separate from scoring and selection, so methods compose
(e.g. Ada-KV's head-wise allocation over a PyramidKV layer schedule, D2O's layer ratios over H2O selection).

A budget is the number of entries one (layer, KV head) may hold, counting everything kept (sinks, windows, heavy
hitters, merged entries). Users give it as a count (`512`) or as a ratio of the prompt length (`0.2`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from minikv.errors import BadInput, is_int

@dataclass(frozen=True)
class Budget:
    """A count of entries (int >= 1) or a ratio of the prompt length (float in (0, 1])."""
    value: int | float

    def __post_init__(self):
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"budget must be a count (e.g. 512) or a ratio (e.g. 0.2), got {v!r} ({type(v).__name__})")
        if isinstance(v, int) and v < 1:
            raise BadInput(f"budget count must be >= 1, got {v}")
        if isinstance(v, float) and not (0 < v <= 1):
            hint = f"; for a count of {int(v)} entries write {int(v)}" if math.isfinite(v) and v == int(v) > 1 else ""
            raise BadInput(f"budget ratio must be in (0, 1], got {v!r}{hint}")

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    def entries(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Budget in entries per batch row (B,), from each row's prompt length (ratios round down, at least 1)."""
        n = torch.as_tensor(prompt_lengths, dtype=torch.long)
        return (n.double() * self.value).floor().long().clamp_min(1) if self.is_ratio else torch.full_like(n, self.value)

    def __str__(self) -> str:
        # repr keeps the decimal point (1.0, not 1), so a ratio never reads as a count.
        return repr(self.value) if self.is_ratio else str(self.value)

def parse_budget(text: str | int | float | Budget | None) -> Budget | None:
    """'0.2' -> ratio 0.2; '512' -> 512 entries; None stays None (the policy keeps everything).
    Written with a decimal point or an exponent ('1.0', '1e3') the value is a ratio; digits alone are a count."""
    if text is None or isinstance(text, Budget):
        return text
    value = int(text) if is_int(text) else text if isinstance(text, float) else None
    if isinstance(text, str):
        for kind in (int, float):
            try:
                value = kind(text.strip())
                break
            except ValueError:
                pass
        else:
            raise BadInput(f"budget {text!r} is neither a count (e.g. 512) nor a ratio (e.g. 0.2)")
    if value is None:
        raise BadInput(f"budget must be a count (e.g. 512), a ratio (e.g. 0.2) or a string of one, "
                       f"got {text!r} ({type(text).__name__})")
    try:
        return Budget(value)
    except BadInput as e:              # parsed, but out of range: name what the user wrote and the rule it broke
        raise BadInput(f"budget {text!r}: {e}") from None

def pyramid_prefix_budgets(prefix_budget: torch.Tensor, prompt_lengths: torch.Tensor, window: int,
                           n_layers: int, beta: int = 20) -> torch.Tensor:
    """PyramidKV's linearly decreasing per-layer prefix budgets (train_free.md §5), (B,) -> (L, B).
    b = average prefix budget; min_b = b // beta; max_b = 2b - min_b, capped at n - w (then min_b = 2b - max_b);
    step = (max_b - min_b) // (L - 1); layer l keeps max_b - l * step prefix entries."""
    b = prefix_budget.long()
    n = torch.as_tensor(prompt_lengths, dtype=torch.long, device=b.device)
    min_b, max_b = b // beta, 2 * b - b // beta
    capped = max_b >= n - window
    max_b = torch.where(capped, n - window, max_b)
    min_b = torch.where(capped, 2 * b - max_b, min_b)
    step = (max_b - min_b) // max(1, n_layers - 1)
    layers = torch.arange(n_layers, device=b.device)[:, None]
    return max_b[None, :] - layers * step[None, :]

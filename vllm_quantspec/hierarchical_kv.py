"""Reference math of the hierarchical INT4/INT8 KV cache (the project's single source of truth).

Every kernel is tested against these functions. Math is fp32, functions are small and pure.
"""

import torch


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round fp32 `x` to `dtype` toward +inf (`up`) or -inf, never to nearest.

    Directed rounding keeps stored metadata conservative: a minimum rounded down still lies
    below every value of its group, a scale rounded up still spans the whole range.
    """
    y = x.to(dtype)  # round to nearest, then step one ulp where that went the wrong way
    wrong = y.float() < x if up else y.float() > x
    toward = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, toward), y)

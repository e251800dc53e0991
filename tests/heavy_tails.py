"""Heavy-tailed test data, as in real LLM weights and activations: Student's t with 2 degrees of freedom."""

from __future__ import annotations

import torch


def student_t2(shape, generator: torch.Generator) -> torch.Tensor:
    """t with 2 degrees of freedom drawn from `generator`: z / sqrt(chi2_2 / 2), chi2_2 = -2 ln U.
    torch.distributions.StudentT would draw from the global generator and give every run other data."""
    return torch.randn(shape, generator=generator) / torch.rand(shape, generator=generator).log().neg().sqrt()

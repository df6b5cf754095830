"""Thin fp32 SVD of a weight: what both the adapter (computing in place) and the SVD cache (building a
file) factor a Linear with, so neither imports the other for it."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fastest_device", "svd_factors"]


def fastest_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def svd_factors(weight: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin fp32 SVD of W [d_out, d_in] on `device` (default: cuda if present) -> CPU (U, S, Vh)."""
    dev = torch.device(device) if device is not None else fastest_device()
    U, S, Vh = torch.linalg.svd(weight.detach().to(dev, torch.float32), full_matrices=False)
    return U.cpu(), S.cpu(), Vh.cpu()

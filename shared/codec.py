"""The float codec of the wire: a flat fp32 vector as little-endian float32 bytes (DeltaSUpdate.data
and .quarantine). The learner encodes, every engine decodes; one definition keeps both ends alike."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_floats", "encode_floats"]


def decode_floats(data: bytes | bytearray | memoryview) -> Tensor:
    """Little-endian float32 bytes -> fp32 CPU tensor (a copy: the bytes may be read-only)."""
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())


def encode_floats(flat: Tensor) -> bytes:
    """Any tensor -> its values as fp32, little-endian bytes (flattened in storage order)."""
    return flat.detach().float().cpu().numpy().astype("<f4").tobytes()

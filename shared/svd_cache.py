"""On-disk SVD cache: one safetensors file per (model id, revision, dtype, module path).

Layout: <root>/<model slug>/<revision or "norev">/<dtype>/<module path>.safetensors holding
U [d_out,r] and Vh [r,d_in] in the model dtype and S [r] in fp32 (full rank; truncation happens at
wrap time). The metadata carries a fingerprint of the weight it came from (sha256 over shape,
dtype and an evenly strided sample of W), so a file written for another model, another checkpoint
under the same name, or another shape is detected and rebuilt with a warning, never used. A file
that does not parse (bad header, truncated) is rebuilt the same way.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from shared.svd import svd_factors

log = logging.getLogger("rankguard.svd_cache")
FORMAT = "rankguard-svd-v1"
_SAMPLE = 1 << 16


def weight_fingerprint(weight: Tensor) -> str:
    """Cheap identity of W: sha256 over shape, dtype and <= 65,536 evenly strided values."""
    flat = weight.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // _SAMPLE))
    sample = flat[::stride].float().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|{flat.numel()}".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip("/")) or "model"


@dataclass
class CacheStats:
    loaded: int = 0
    built: int = 0
    rebuilt: int = 0  # subset of built: a bad or foreign file was replaced
    t_load: float = 0.0
    t_build: float = 0.0
    problems: list[str] = field(default_factory=list)


class SVDCache:
    """Per-module SVD factors, computed on the fastest device present and reused on later starts."""

    def __init__(self, root: str | Path, device: str | torch.device | None = None):
        self.root = Path(root)
        self.device = device
        self.stats = CacheStats()

    def path(self, model_id: str, revision: str | None, dtype: torch.dtype, module: str) -> Path:
        dt = str(dtype).removeprefix("torch.")
        return self.root / _slug(model_id) / _slug(revision or "norev") / dt / f"{module}.safetensors"

    def _read(self, path: Path, module: str, weight: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor] | None, str]:
        """(factors, "") when the file is valid for this weight, else (None, why)."""
        if not path.exists():
            return None, "missing"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    return None, f"unknown format {meta.get('format')!r}"
                if meta.get("module") != module:
                    return None, f"written for module {meta.get('module')!r}"
                fp = weight_fingerprint(weight)
                if meta.get("fingerprint") != fp:
                    return None, (f"built for another model/weights (fingerprint {meta.get('fingerprint')} "
                                  f"from {meta.get('model_id')!r}, this weight has {fp})")
                U, S, Vh = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("Vh")
        except Exception as e:  # noqa: BLE001 - any parse failure means "corrupt", rebuild
            return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        d_out, d_in = weight.shape
        r = min(d_out, d_in)
        if U.shape != (d_out, r) or S.shape != (r,) or Vh.shape != (r, d_in):
            return None, (f"shape mismatch: U {tuple(U.shape)} S {tuple(S.shape)} Vh {tuple(Vh.shape)} "
                          f"for weight {tuple(weight.shape)}")
        if not torch.isfinite(S).all():
            return None, "non-finite singular values"
        return (U, S, Vh), ""

    def factors(self, model_id: str, revision: str | None, module: str,
                weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full-rank (U, S, Vh) for `weight` (CPU; U, Vh in W's dtype, S fp32): load, or build + save."""
        path = self.path(model_id, revision, weight.dtype, module)
        t0 = time.perf_counter()
        got, why = self._read(path, module, weight)
        if got is not None:
            self.stats.loaded += 1
            self.stats.t_load += time.perf_counter() - t0
            return got
        if why != "missing":
            log.warning("svd cache %s: %s; rebuilding", path, why)
            self.stats.problems.append(f"{module}: {why}")
            self.stats.rebuilt += 1
        t0 = time.perf_counter()
        U, S, Vh = svd_factors(weight, self.device)
        U, Vh = U.to(weight.dtype).contiguous(), Vh.to(weight.dtype).contiguous()
        S = S.float().contiguous()
        self.stats.t_build += time.perf_counter() - t0
        self.stats.built += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model_id": model_id, "revision": revision or "", "module": module,
                "dtype": str(weight.dtype), "shape": f"{weight.shape[0]},{weight.shape[1]}",
                "fingerprint": weight_fingerprint(weight)}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"U": U, "S": S, "Vh": Vh}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return U, S, Vh

"""vLLM worker extension: hold the frozen SVD factors on the worker, merge each delta_S push into it.

vLLM mixes this class into its Worker (`LLM(..., worker_extension_cls="rollout.vllm_worker_ext.
DeltaSWorkerExtension")`); the engine calls its methods by name through `llm.collective_rpc`.
Only small strings cross that RPC (tensors do not pickle there): the setup spec is JSON and each
update is a safetensors file whose path the worker reads itself.

Weights go in through the one supported in-place path of the pinned vLLM (0.32):
`self.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, with HF checkpoint names,
so vLLM itself fuses q/k/v and gate/up and repacks for its kernels. A fused layer is processed
once all its parts arrived, so every update also re-sends the untouched parts of partially
targeted fused layers and their biases (kept from the checkpoint, on the worker's device).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rollout.merge import DeltaMerger, MergeError, factors_from_weight

log = logging.getLogger("rankguard.vllm_worker")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM logs one warning per untouched layer on a partial reload ("Failed to load weights" + the
# full list of weights not loaded): expected here, since only the adapter's modules change.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"


def natural_key(name: str) -> list:
    """'layers.10.x' after 'layers.9.x': digits compare as numbers (≈ model order from checkpoint keys)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def checkpoint_index(model_dir: str | Path) -> dict[str, Path]:
    """{tensor name: safetensors file} for an HF model folder (single file or sharded)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; the vLLM engine needs an HF safetensors folder")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                index[k] = f
    return index


def target_module_names(index: dict[str, Path], targets: list[str]) -> list[str]:
    """Modules the adapter wraps: 2-D '<module>.weight' tensors whose module ends in a target name.

    Same rule as shared.adapter.wrap_model (name == target or endswith '.' + target), read off the
    checkpoint instead of an nn.Module tree, in natural (≈ model) order.
    """
    out = []
    for key in index:
        if not key.endswith(".weight"):
            continue
        mod = key[: -len(".weight")]
        if any(mod == t or mod.endswith("." + t) for t in targets):
            out.append(mod)
    return sorted(out, key=natural_key)


def read_tensors(index: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    out = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in keys:
                out[k] = h.get_tensor(k)
    return out


class DeltaSWorkerExtension:
    """Methods vLLM adds to each worker. Call through `llm.collective_rpc("rg_...", args=(str,))`."""

    # -------------------------------------------------------------- setup
    def rg_setup(self, spec_json: str) -> dict[str, Any]:
        """Load/compute the SVD factors once and build the merger on the worker's device.

        spec: model_dir, model_id (SVD cache key, as the learner's load_policy uses), revision,
        svd_cache_dir (or null: compute without caching), target_modules, rank, dtype,
        tie_word_embeddings.
        """
        t0 = time.perf_counter()
        spec = json.loads(spec_json)
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        dtype = DTYPES[spec["dtype"]]
        index = checkpoint_index(spec["model_dir"])
        names = target_module_names(index, list(spec["target_modules"]))
        if not names:
            raise MergeError(f"no checkpoint weight matches target_modules {spec['target_modules']}")
        weights = read_tensors(index, [n + ".weight" for n in names])
        cache = None
        if spec.get("svd_cache_dir"):
            from shared.svd_cache import SVDCache

            cache = SVDCache(spec["svd_cache_dir"], device=device)
        factors: "OrderedDict[str, tuple]" = OrderedDict()
        for n in names:
            W = weights.pop(n + ".weight").to(dtype)  # the learner's weight: HF loads in cfg dtype
            if cache is not None:
                svd = cache.factors(spec["model_id"], spec.get("revision"), n, W)
            else:
                from shared.svd import svd_factors

                U, S, Vh = svd_factors(W, device)
                svd = (U.to(dtype), S, Vh.to(dtype))
            factors[n] = factors_from_weight(W, svd, spec.get("rank"))
        self._rg_merger = DeltaMerger(factors, device=device, out_dtype=dtype)
        del factors
        self._rg_static = self._static_tensors(model, index, names, dtype, device)
        self._rg_tied = bool(spec.get("tie_word_embeddings")) and device.type == "cpu"
        self._rg_version = 0
        logging.getLogger(_RELOAD_LOGGER).setLevel(logging.ERROR)
        return {"modules": len(names), "deltas": self._rg_merger.total, "static_tensors": len(self._rg_static),
                "factor_mib": round(self._rg_merger.nbytes() / 2**20, 2), "device": str(device),
                "setup_s": round(time.perf_counter() - t0, 3),
                "cache": None if cache is None else {"loaded": cache.stats.loaded, "built": cache.stats.built}}

    @staticmethod
    def _static_tensors(model, index, names: list[str], dtype, device) -> "OrderedDict[str, torch.Tensor]":
        """Biases of targeted modules + untargeted siblings in the same fused vLLM layer (q/k/v, gate/up).

        vLLM processes a fused layer only when every part of it was loaded, so these go along with
        every update unchanged.
        """
        packed = getattr(model, "packed_modules_mapping", None) or {}
        groups = [list(v) for v in packed.values()]
        targeted = set(names)
        keys: list[str] = []
        for n in names:
            prefix, _, leaf = n.rpartition(".")
            mods = [n]
            for g in groups:
                if leaf in g:
                    mods += [f"{prefix}.{s}" if prefix else s for s in g]
            for m in dict.fromkeys(mods):
                cand = [f"{m}.bias"] + ([] if m in targeted else [f"{m}.weight"])
                keys += [k for k in cand if k in index and k not in keys]
        tensors = read_tensors(index, keys)
        return OrderedDict((k, tensors[k].to(device, dtype)) for k in sorted(keys, key=natural_key))

    # -------------------------------------------------------------- updates
    def rg_load_delta(self, payload_path: str) -> dict[str, Any]:
        """Read (delta, names, sizes, version) from a safetensors file, merge, reload in place."""
        t0 = time.perf_counter()
        data = load_file(payload_path)
        with safe_open(payload_path, framework="pt") as h:
            meta = h.metadata() or {}
        names, sizes = json.loads(meta["names"]), json.loads(meta["sizes"])
        delta = data["delta"]
        t_read = time.perf_counter() - t0
        merged = self._rg_merger.merged(delta, names, sizes)  # validates the layout before loading
        first = next(merged)

        def weights():
            yield from self._rg_static.items()
            yield first
            yield from merged

        t1 = time.perf_counter()
        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        if self._rg_tied:  # CPU lm_head keeps a stale packed copy of tied embeddings after a reload
            lm_head = self.model_runner.get_model().lm_head
            lm_head.quant_method.process_weights_after_loading(lm_head)
        self._rg_version = int(meta.get("version", -1))
        return {"version": self._rg_version, "read_s": round(t_read, 4),
                "merge_load_s": round(time.perf_counter() - t1, 4), "total_s": round(time.perf_counter() - t0, 4)}

    def rg_info(self) -> dict[str, Any]:
        return {"version": getattr(self, "_rg_version", None),
                "merger": repr(getattr(self, "_rg_merger", None))}

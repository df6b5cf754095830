"""`rankguard adapter report`: wrap the configured model and check the AntiPaSTO round trip.

It also lists every Linear module kind of the model (layer index folded to `*`) as wrapped or not,
with counts and parameter share: which projections delta_S can move is a choice made by
`model.target_modules`, and on hybrid models (Qwen3.5: Gated-DeltaNet `linear_attn.*` layers beside
full-attention ones) the default names leave whole kinds out. The report makes that visible.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

REPORT_FILE = "adapter_report.json"
FIXED_PROMPT = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"

adapter_app = typer.Typer(help="AntiPaSTO adapter: wrap checks, SVD cache timings.", no_args_is_help=True)


def linear_kinds(model, targets: list[str]) -> list[dict]:
    """One row per Linear kind ("model.layers.*.mlp.up_proj"): wrapped?, count, params, share of all Linear
    params and share of the decoder layers' Linear params (no lm_head: it is tied to the embeddings on
    small Qwen models and never a target); model order. `wrapped` uses wrap_model's own rule (name ==
    target or ends in "." + target)."""
    from torch import nn

    from shared.adapter import AntiPaSTOLinear, _matches

    rows: dict[str, dict] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, AntiPaSTOLinear)):
            continue
        kind = re.sub(r"\.\d+(?=\.)", ".*", name)
        row = rows.setdefault(kind, {"kind": kind, "wrapped": any(_matches(name, t) for t in targets),
                                     "count": 0, "params": 0})
        row["count"] += 1
        row["params"] += m.in_features * m.out_features
    total = sum(r["params"] for r in rows.values()) or 1
    in_layers = sum(r["params"] for r in rows.values() if ".*." in r["kind"]) or 1
    for r in rows.values():
        r["share"] = round(r["params"] / total, 4)
        r["share_in_layers"] = round(r["params"] / in_layers, 4) if ".*." in r["kind"] else None
    return list(rows.values())


def build_report(preset: str, overrides: list[str], rebuild: bool = False) -> dict:
    """Load unwrapped -> reference logits; wrap (SVD build or cache load) -> max |Δlogit| at delta_S=0;
    load again -> cache reload time. Returns the report dict (also written to <run_dir>)."""
    import torch

    from shared.adapter import adapter_modules, wrap_model
    from shared.config import resolve_config
    from shared.modeling import load_policy
    from shared.svd_cache import SVDCache

    cfg = resolve_config(preset, overrides)
    tmp = tempfile.TemporaryDirectory(prefix="rankguard-svd-") if rebuild else None
    if tmp is not None:
        cfg.model.svd_cache_dir = tmp.name
    torch.set_num_threads(max(1, cfg.train.torch_threads))
    try:
        policy = load_policy(cfg, wrap=False)
        model, tok = policy.model, policy.tokenizer
        ids = tok(FIXED_PROMPT, return_tensors="pt").input_ids.to(policy.device)
        with torch.no_grad():
            ref = model(ids).logits.float()
        kinds = linear_kinds(model, cfg.model.target_modules)
        cache = SVDCache(cfg.model.svd_cache_dir)
        t0 = time.perf_counter()
        names = wrap_model(model, cfg.model.target_modules, rank=cfg.model.rank, cache=cache,
                           model_id=policy.model_id, revision=cfg.model.revision)
        wrap_first_s = time.perf_counter() - t0
        with torch.no_grad():
            dlogit = (model(ids).logits.float() - ref).abs().max().item()
        mods = adapter_modules(model)
        first = cache.stats
        del model, policy, mods
        again = load_policy(cfg, wrap=True)
        reload = again.cache_stats
        mods = adapter_modules(again.model)
        per_target: dict[str, int] = {}
        for n in names:
            leaf = n.rsplit(".", 1)[-1]
            per_target[leaf] = per_target.get(leaf, 0) + 1
        report = {
            "model_id": again.model_id, "dtype": cfg.model.dtype, "device": str(again.device),
            "rank": cfg.model.rank or "full", "modules_wrapped": len(names), "per_target": per_target,
            "delta_s_params": sum(m.rank for m in mods.values()),
            "buffer_bytes": sum(b.numel() * b.element_size() for m in mods.values() for b in m.buffers()),
            "svd_modules_built": first.built, "svd_build_s": round(first.t_build, 4) if first.built else None,
            "svd_cache_problems": first.problems, "wrap_first_s": round(wrap_first_s, 4),
            "cache_modules_loaded": reload.loaded, "cache_reload_s": round(reload.t_load, 4),
            "wrap_from_cache_s": round(again.wrap_s, 4),
            "prompt_tokens": int(ids.shape[1]), "max_abs_dlogit_at_zero": dlogit,
            "svd_cache_dir": None if rebuild else cfg.model.svd_cache_dir,
            "target_modules": list(cfg.model.target_modules), "linear_kinds": kinds,
            "linear_params_wrapped_share": round(sum(k["share"] for k in kinds if k["wrapped"]), 4),
            "layer_linear_params_wrapped_share": round(sum(k["share_in_layers"] or 0 for k in kinds if k["wrapped"]), 4),
            "unwrapped_kinds": [k["kind"] for k in kinds if not k["wrapped"]],
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = Path(cfg.run_dir) / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    report["written_to"] = str(out)
    return report


@adapter_app.command("report")
def report_cmd(
    preset: str = typer.Option("toy", "--preset", help="config preset (toy, lite, qwen35-2b, full)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="dotted override KEY=VALUE, repeatable "
                                                  "(e.g. --set model.rank=16)"),
    brief: bool = typer.Option(False, "--brief", help="only the summary table (no per-kind table)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="time a fresh SVD build in a throwaway cache dir "
                                 "instead of using model.svd_cache_dir"),
) -> None:
    """Wrap the configured model with AntiPaSTO and report: modules wrapped, delta_S params, SVD build
    vs cache reload time, and max |Δlogit| at delta_S=0 on a fixed prompt (JSON in <run_dir>)."""
    from rich.console import Console
    from rich.table import Table

    from shared.adapter import AdapterError
    from shared.config import ConfigError
    from shared.modeling import ModelLoadError

    try:
        rep = build_report(preset, overrides or [], rebuild)
    except (ConfigError, AdapterError, ModelLoadError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    table = Table(title=f"AntiPaSTO adapter — {rep['model_id']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("modules wrapped", f"{rep['modules_wrapped']} ({', '.join(f'{k}:{v}' for k, v in rep['per_target'].items())})"),
        ("delta_S params", f"{rep['delta_s_params']:,}"),
        ("rank", str(rep["rank"])),
        ("dtype / device", f"{rep['dtype']} / {rep['device']}"),
        ("SVD build", "cache was warm (use --rebuild)" if rep["svd_build_s"] is None
         else f"{rep['svd_build_s']:.3f} s ({rep['svd_modules_built']} modules)"),
        ("cache reload", f"{rep['cache_reload_s']:.3f} s ({rep['cache_modules_loaded']} modules)"),
        ("max |Δlogit| at delta_S=0", f"{rep['max_abs_dlogit_at_zero']:.3g}"),
        ("not wrapped", ", ".join(f"{k['kind'].removeprefix('model.layers.*.')} ({k['share']:.1%} of params)"
                                  for k in rep["linear_kinds"] if not k["wrapped"]) or "-"),
        ("report", rep["written_to"]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    if brief:
        return
    kinds = Table(title=f"Linear modules by kind: wrapped {rep['layer_linear_params_wrapped_share']:.1%} of the "
                        f"decoder layers' Linear parameters, {rep['linear_params_wrapped_share']:.1%} of all "
                        f"(targets: {', '.join(rep['target_modules'])}; kinds under model.layers.*)")
    for col, just in (("kind", "left"), ("wrapped", "left"), ("count", "right"), ("params", "right"),
                      ("share in layers", "right"), ("share of all", "right")):
        kinds.add_column(col, justify=just)
    for k in rep["linear_kinds"]:
        layers = "-" if k["share_in_layers"] is None else f"{k['share_in_layers']:.1%}"
        kinds.add_row(k["kind"].removeprefix("model.layers.*."), "yes" if k["wrapped"] else "NO", str(k["count"]), f"{k['params']:,}", layers,
                      f"{k['share']:.1%}")
    console.print(kinds)


def register(app: typer.Typer) -> None:
    app.add_typer(adapter_app, name="adapter")

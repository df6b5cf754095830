"""`rankguard engine check`: load a rollout engine, sample, push a delta_S, sample again, compare to HF."""
from __future__ import annotations

import json
import time
from typing import Optional

import typer

from shared.clikit import SET_HELP, UserError, friendly_errors

engine_app = typer.Typer(help="Rollout engines (vLLM, HF generate): health and agreement checks.",
                         no_args_is_help=True)

ENGINES = ("vllm", "hf")
FALLBACK_PROMPT = "Write a Python function add(a, b) that returns the sum of a and b."


def _prompt_ids(cfg, tokenizer) -> list[int]:
    """First training problem's chat prompt when the problem set loads, else a fixed chat prompt."""
    from shared.prompts import build_messages, render_prompt

    try:
        from shared.modeling import load_problem_sets

        train, _ = load_problem_sets(cfg)
        text = render_prompt(tokenizer, build_messages(train[0], cfg.reward.prompt_variant))
    except Exception:  # noqa: BLE001 - any problem-set trouble: the check still needs a prompt
        from shared.prompts import Message

        text = render_prompt(tokenizer, [Message(role="user", content=FALLBACK_PROMPT)])
    return tokenizer(text, add_special_tokens=False).input_ids


def _max_logprob_diff(model, group, delta) -> float:
    import torch

    from shared.logprobs import token_logprobs
    from shared.adapter import set_delta

    set_delta(model, delta)
    dev = next(model.parameters()).device
    worst = 0.0
    with torch.no_grad():
        for c in group.completions:
            if not c.token_ids:
                continue
            ids = torch.tensor([group.prompt_ids + c.token_ids], device=dev)
            ref = token_logprobs(model, ids)[0, len(group.prompt_ids) - 1:].cpu()
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def run_check(cfg, engine: str, delta_scale: float = 0.05, seed: int = 0) -> dict:
    """Start `engine`, generate a group, push a nonzero delta_S (version 1), generate again; compare
    each group's log-probs with the learner's HF forward of the wrapped model at the same delta."""
    import torch

    from shared.adapter import delta_s_layout
    from shared.codec import encode_floats
    from shared.modeling import load_policy
    from shared.schemas import DeltaSUpdate, PromptJob, SamplingParams

    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    torch.set_num_threads(max(1, cfg.train.torch_threads))
    report: dict = {"engine": engine, "model": cfg.model.name_or_path, "dtype": cfg.model.dtype}
    t0 = time.perf_counter()
    if engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        eng = VLLMEngine(cfg)
    else:
        from rollout.hf_engine import HFEngine

        own = load_policy(cfg, progress=False)
        eng = HFEngine(own.model, own.tokenizer, own.device)
    report["start_s"] = round(time.perf_counter() - t0, 2)
    try:
        learner = load_policy(cfg, progress=False)  # the learner's own copy, never the engine's
        names, sizes = delta_s_layout(learner.model)
        ids = _prompt_ids(cfg, learner.tokenizer)
        s = cfg.sampling
        job = PromptJob(job_id="check", step=0, problem_id="check", prompt_text="", prompt_ids=ids,
                        sampling=SamplingParams(n=s.group_size, max_new_tokens=s.max_new_tokens,
                                                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                                min_p=s.min_p, seed=seed))
        t0 = time.perf_counter()
        g0 = eng.generate([job])[0]
        report["generate_v0_s"] = round(time.perf_counter() - t0, 3)
        delta = delta_scale * torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
        upd = DeltaSUpdate(version=1, names=names, sizes=sizes, data=encode_floats(delta))
        t0 = time.perf_counter()
        eng.load_delta(upd)
        report["reload_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        g1 = eng.generate([job])[0]
        report["generate_v1_s"] = round(time.perf_counter() - t0, 3)
        report["versions"] = [g0.policy_version, g1.policy_version]
        report["tokens"] = [sum(len(c.token_ids) for c in g.completions) for g in (g0, g1)]
        report["outputs_changed"] = [c.token_ids for c in g0.completions] != [c.token_ids for c in g1.completions]
        report["max_logprob_diff_v0"] = _max_logprob_diff(learner.model, g0, torch.zeros_like(delta))
        report["max_logprob_diff_v1"] = _max_logprob_diff(learner.model, g1, delta)
        report["sample_v1"] = g1.completions[0].text[:200]
        if engine == "vllm":
            report["engine_info"] = eng.info
    finally:
        if engine == "vllm":
            eng.close()
    return report


@engine_app.command("check")
@friendly_errors
def check(
    preset: str = typer.Option("toy", help="Config preset (toy, lite, qwen35-2b, full)."),
    engine: str = typer.Option("vllm", help="Engine to check: vllm or hf."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    delta_scale: float = typer.Option(0.05, help="Std of the random delta_S pushed as version 1."),
    tol: Optional[float] = typer.Option(None, help="Max allowed |logprob diff| vs the HF forward "
                                                   "(default 1e-3 in float32, 0.1 in bf16/fp16)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Load the engine, generate one group, push a nonzero delta_S, generate again.

    Prints versions, timings (engine start, generate, reload) and the max |logprob diff| of each
    group against the learner's HF forward of the same AntiPaSTO-wrapped model at the same delta_S.
    Exit code 1 when the diff exceeds --tol or the version tags are not [0, 1].
    """
    from shared.clikit import config_from_flags

    cfg = config_from_flags(preset, overrides)
    rep = run_check(cfg, engine, delta_scale=delta_scale)
    limit = tol if tol is not None else (1e-3 if cfg.model.dtype == "float32" else 0.1)
    worst = max(rep["max_logprob_diff_v0"], rep["max_logprob_diff_v1"])
    ok = worst <= limit and rep["versions"] == [0, 1]
    rep["tolerance"], rep["ok"] = limit, ok
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"engine check: {engine} on {cfg.model.name_or_path} ({cfg.model.dtype})")
        t.add_column("what")
        t.add_column("value")
        for k in ("start_s", "generate_v0_s", "reload_s", "generate_v1_s", "versions", "tokens",
                  "outputs_changed", "max_logprob_diff_v0", "max_logprob_diff_v1", "tolerance"):
            v = rep[k]
            t.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
        t.add_row("result", "[green]ok[/green]" if ok else "[red]FAILED[/red]")
        Console().print(t)
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")

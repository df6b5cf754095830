"""`rankguard vhack ...`: build and check the v_hack directions (spec B) the projection arms use.

The config's `vhack` section picks the pair set (vhack.pair_set), the basis (vhack.basis, vhack.k) and
the noise floors; `--set vhack.basis=svd --set vhack.k=5` etc. `decompose` splits the solution
construction into its correctness and mechanism parts (issue #13)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shared.clikit import SET_HELP, config_from_flags, friendly_errors
from shared.config import PRESETS
from shared.hacks import MODES

vhack_app = typer.Typer(help="Contrastive pairs and the gradient-side v_hack directions (extract, validate).",
                        no_args_is_help=True)

PRESET_HELP = f"Run preset, one of: {', '.join(PRESETS)}."
MODES_HELP = ("Hack modes whose train pairs define v_hack, comma-separated (A rt, B se, C so, D fm). "
              "A,B = the weak-detector arm. Default: the config's train.vhack_modes.")


def parse_modes(text: str | None, default: list[str]) -> list[str]:
    if not text:
        return list(default)
    modes = [m.strip().upper() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown hack mode {bad[0] if bad else text!r} in --modes; valid: {', '.join(MODES)}")
    return sorted(set(modes), key=MODES.index)


def _setup(cfg, with_problems: bool = False):
    """Pairs (before the model, so bad input fails fast), then the wrapped policy."""
    import torch

    from shared.modeling import load_policy, load_problem_sets

    from learner import vhack as V

    torch.set_num_threads(max(1, cfg.train.torch_threads))
    problems = None if cfg.problems == "leetcode" else load_problem_sets(cfg)[0]
    pairs = V.pairs_for_config(cfg, problems)
    policy = load_policy(cfg)
    return (policy, pairs, problems) if with_problems else (policy, pairs)


def _print_report(report) -> None:
    typer.echo(f"median cos   {report.median:+.4f}")
    typer.echo(f"frac > 0     {report.frac_positive:.4f}  ({sum(c > 0 for c in report.cos)}/{len(report.cos)} modules)")
    typer.echo(f"mean cos     {report.mean:+.4f}")
    typer.echo(report.summary())


def _cache_path(cfg, policy, pairs, modes: list[str]) -> Path:
    """Where training looks for this v_hack (learner.artifacts): cfg.vhack_path, else the shared cache.
    Non-default extraction settings (svd basis, floors) add a suffix (learner.vhack.directions_tag)."""
    from learner.artifacts import artifacts_dir, model_hash
    from learner.pairs import pair_set_hash
    from learner.vhack import directions_tag

    if cfg.vhack_path:
        return Path(cfg.vhack_path)
    tag = "".join(sorted(modes))
    return artifacts_dir() / (f"vhack-{model_hash(policy.model, cfg)}-{pair_set_hash(pairs)}-{tag}"
                              f"{directions_tag(cfg.vhack)}.safetensors")


def _solution_pairs(cfg, pairs, problems=None):
    """The solution construction of this config's problems (the active set itself when it is `solution`)."""
    from learner.vhack import pairs_for_config

    if cfg.vhack.pair_set == "solution":
        return pairs
    sol = cfg.model_copy(deep=True)
    sol.vhack.pair_set = "solution"
    return pairs_for_config(sol, problems)


def _print_decomposition(report) -> None:
    typer.echo(report.summary())
    warning = report.warning()
    if warning:
        typer.secho(warning, fg="yellow", err=True)


@vhack_app.command("extract")
@friendly_errors
def extract(
    preset: str = typer.Option("toy", help=PRESET_HELP),
    modes: Optional[str] = typer.Option(None, help=MODES_HELP),
    out: Optional[Path] = typer.Option(None, help="Where to write the .safetensors (default: cfg.vhack_path, else "
                                       "the artifact cache training reads: artifacts/ or $RANKGUARD_ARTIFACTS)."),
    force: bool = typer.Option(False, help="Re-extract even when the file already exists."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Extract v_hack: per pair, mean-NLL backward on hack and clean completions; per module
    unit(mean grad_hack - mean grad_clean) of delta_S (vhack.basis=svd: the top vhack.k singular axes of
    the per-pair differences). Scores the held-out pairs (no gate here; `rankguard vhack validate` gates)
    and writes safetensors with model/modes/pair-set/held-out metadata."""
    from learner.pairs import split_pairs
    from learner.vhack import extract_directions, save_directions, validate_vhack, vhack_meta

    cfg = config_from_flags(preset, set_)
    use_modes = parse_modes(modes, cfg.train.vhack_modes)
    policy, pairs = _setup(cfg)
    path = out or _cache_path(cfg, policy, pairs, use_modes)
    if path.exists() and not force:
        typer.echo(f"exists: {path} (use --force to re-extract)")
        return
    dirs = extract_directions(policy.model, policy.tokenizer, pairs, cfg.vhack, use_modes)
    held = split_pairs(pairs, "heldout", use_modes)
    report = validate_vhack(policy.model, policy.tokenizer, dirs, held, gate=False, construction=cfg.vhack.pair_set)
    _print_report(report)
    dtype = str(policy.model.get_input_embeddings().weight.dtype)
    meta = vhack_meta(cfg.model.name_or_path, dtype, sorted(use_modes), pairs, model_path=policy.model_id,
                      heldout_median=round(report.median, 4), heldout_frac_positive=round(report.frac_positive, 4),
                      heldout_mean=round(report.mean, 4), heldout_passed=report.passed,
                      cos_heldout={n: round(c, 5) for n, c in report.cos_by_module().items()})
    save_directions(path, dirs, meta)
    k = dirs.k()
    typer.echo(f"wrote {path} ({len(k)} modules, {dirs.n_axes()} axes, {meta['n_pairs']} train pairs, modes "
               f"{meta['modes']}, pair set {cfg.vhack.pair_set} {meta['pair_set_hash']}, basis {cfg.vhack.basis})")


@vhack_app.command("validate")
@friendly_errors
def validate(
    preset: str = typer.Option("toy", help=PRESET_HELP),
    vhack: Optional[Path] = typer.Option(None, help="v_hack file (default: the one training uses for this config, "
                                         "see `extract --out`)."),
    png: Optional[Path] = typer.Option(None, help="Histogram PNG (default: beside the v_hack file)."),
    modes: Optional[str] = typer.Option(None, help="Held-out modes to score (default: the modes the file was "
                                        "extracted from; e.g. C,D tests weak-detector transfer)."),
    cross: bool = typer.Option(True, help="Also score on held-out pairs of a different construction (mechanism "
                               "for a solution v_hack, solution otherwise) and compare this v_hack with the two parts "
                               "of the solution construction (correctness, mechanism); warns when the correctness "
                               "part dominates."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Score v_hack on held-out pairs: per-module cos(held-out grad diff, v_hack); prints median, frac>0,
    mean and writes a histogram. Exit 1 when <= 50 % of modules are positive (the spec's gate, on the
    config's own pair set only)."""
    from learner.pairs import build_pair_set, split_pairs
    from learner.vhack import VHackGateError, decompose_vhack, load_directions, validate_vhack

    from .vhack_plots import plot_validation

    cfg = config_from_flags(preset, set_)
    parse_modes(modes, list(MODES))  # fail fast on a bad --modes
    policy, pairs, problems = _setup(cfg, with_problems=True)
    path = vhack or _cache_path(cfg, policy, pairs, cfg.train.vhack_modes)
    dirs = load_directions(path, expect_model=[cfg.model.name_or_path, policy.model_id])
    use_modes = parse_modes(modes, (dirs.meta.get("modes") or ",".join(MODES)).split(","))
    held = split_pairs(pairs, "heldout", use_modes)
    report = validate_vhack(policy.model, policy.tokenizer, dirs, held, gate=False, construction=cfg.vhack.pair_set)
    png_path = plot_validation(report, png or Path(path).with_suffix(".png"))
    _print_report(report)
    typer.echo(f"histogram: {png_path}")
    if cross:
        solution = _solution_pairs(cfg, pairs, problems)
        other = "mechanism" if cfg.vhack.pair_set == "solution" else "solution"
        other_held = split_pairs(build_pair_set(solution, other), "heldout", use_modes)
        typer.echo(validate_vhack(policy.model, policy.tokenizer, dirs, other_held, gate=False, progress=False,
                                  construction=other).summary())
        # the parts of the solution construction against *this* file's v_hack
        dec, _ = decompose_vhack(policy.model, policy.tokenizer, solution, cfg.vhack, use_modes, full=dirs,
                                 progress=False)
        _print_decomposition(dec)
    try:
        report.check()
    except VHackGateError as e:
        typer.secho(f"gate failed: {e}", fg="red", err=True)
        raise typer.Exit(1) from None


@vhack_app.command("decompose")
@friendly_errors
def decompose(
    preset: str = typer.Option("toy", help=PRESET_HELP),
    modes: Optional[str] = typer.Option(None, help=MODES_HELP),
    out: Optional[Path] = typer.Option(None, help="Write the per-module table as JSON here."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """v_hack of each part of the solution construction: correctness (stub/wrong body vs reference
    solution) and mechanism (the same body with vs without the hack tail), and each one's per-module cos
    with the whole construction's v_hack. Warns when the correctness part dominates."""
    import json

    from learner.vhack import decompose_vhack

    cfg = config_from_flags(preset, set_)
    use_modes = parse_modes(modes, cfg.train.vhack_modes)
    policy, pairs, problems = _setup(cfg, with_problems=True)
    solution = _solution_pairs(cfg, pairs, problems)
    report, _ = decompose_vhack(policy.model, policy.tokenizer, solution, cfg.vhack, use_modes)
    width = max(len(n) for n in report.names)
    typer.echo(f"{'module':{width}s}  cos(v,corr)  cos(v,mech)  cos(corr,mech)")
    for n, a, b, c in zip(report.names, report.cos_correctness, report.cos_mechanism, report.cos_parts):
        typer.echo(f"{n:{width}s}  {a:+11.3f}  {b:+11.3f}  {c:+14.3f}")
    _print_decomposition(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report.model_dump(), "median_correctness": report.median_correctness,
                                   "median_mechanism": report.median_mechanism,
                                   "correctness_dominates": report.correctness_dominates}, indent=1))
        typer.echo(f"wrote {out}")


@vhack_app.command("pairs")
@friendly_errors
def pairs_cmd(
    preset: str = typer.Option("toy", help=PRESET_HELP),
    out: Optional[Path] = typer.Option(None, help="Write the pair set as jsonl here."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Show the contrastive pair set this config uses (counts per split and mode, hash); optionally save it."""
    import collections

    from shared.modeling import load_problem_sets

    from learner.pairs import pair_set_hash, save_pairs
    from learner.vhack import pairs_for_config

    cfg = config_from_flags(preset, set_)
    problems = None if cfg.problems == "leetcode" else load_problem_sets(cfg)[0]
    pairs = pairs_for_config(cfg, problems)
    counts = collections.Counter((p.split, p.mode) for p in pairs)
    for split in ("train", "heldout"):
        row = "  ".join(f"{m}:{counts[(split, m)]}" for m in MODES)
        typer.echo(f"{split:8s} {sum(counts[(split, m)] for m in MODES):3d}  {row}")
    typer.echo(f"pair set {cfg.vhack.pair_set} {pair_set_hash(pairs)} ({len(pairs)} pairs, "
               f"{len({p.problem_id for p in pairs})} problems, end-of-turn token: "
               f"{'yes' if pairs and pairs[0].end_of_turn else 'no'})")
    if out:
        typer.echo(f"wrote {save_pairs(pairs, out)}")


def register(app: typer.Typer) -> None:
    app.add_typer(vhack_app, name="vhack")

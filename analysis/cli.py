"""`rankguard experiment` (arms × seeds runner), `rankguard report` (headline table, Pareto, H1/H3/H4) and
`rankguard diagnose` (post-hoc: why a null is a null)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shared.clikit import SET_HELP, friendly_errors

DEFAULT_ARMS = "vanilla,projected,projected_nomag,rebound,weak"


def _sigterm_as_interrupt() -> None:
    """`kill PID` stops an experiment like Ctrl-C: the current run's cleanup runs (services are shut down)
    and experiment.json records it as interrupted; the next invocation resumes it."""
    import signal
    import threading

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def register(app: typer.Typer) -> None:
    @app.command("summary")
    @friendly_errors
    def summary(run_dir: Path = typer.Argument(..., help="One run's folder (metrics.jsonl inside).")) -> None:
        """Per-step table, trajectory.png and where the run's files are (what `train`/`up` print at the end)."""
        from analysis.run_card import run_card
        from shared.clikit import UserError

        if not (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} has no metrics.jsonl (not a run folder, or no step finished yet)")
        typer.echo(run_card(run_dir, next_hint=False))

    @app.command("experiment")
    @friendly_errors
    def experiment(
        preset: str = typer.Option("toy", help="Config preset (toy, lite, qwen35-2b, full)."),
        arms: str = typer.Option(DEFAULT_ARMS, help="Comma-separated arm names: the spec's (vanilla, projected, "
                                                    "projected_nomag, rebound, weak, route) or exploratory ones from "
                                                    "shared/arms.py (projected_svd5, mechanism, placebo, "
                                                    "weak_flagged, oracle = the ceiling cheat ...)."),
        seeds: Optional[str] = typer.Option(None, help="A count (3 -> seeds 0,1,2) or a comma list (41,42,43). "
                                                       "Default: 8 for the toy preset, else 3."),
        steps: Optional[int] = typer.Option(None, help="Training steps per run (default: the preset's)."),
        mode: Optional[str] = typer.Option(None, help="services (Redis + workers + learner) or inprocess. Default: "
                                                      "inprocess for the toy preset (faster on 2 cores), else services."),
        out: Optional[Path] = typer.Option(None, help="Experiment folder (default runs/exp-<preset>)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        report: bool = typer.Option(True, help="Write the report when the runs end."),
        controls: bool = typer.Option(False, "--controls", help="Add each direction arm's matched random-direction "
                                                                "control (route -> route+random; shared.arms."
                                                                "with_controls); the report pairs them per seed."),
        progress: bool = typer.Option(True, help="Show the live progress display."),
        parallel: Optional[int] = typer.Option(None, min=1, help="Runs at once, each its own process (services: a "
                                                                 "process tree; inprocess: a spawned interpreter with "
                                                                 "one torch thread). Default: 2 for the toy preset "
                                                                 "(the 2-core boxes), else 1; on a GPU box keep 1 per "
                                                                 "GPU."),
    ) -> None:
        """Run every (arm, seed) into OUT/<arm>/seed<k>/ (--parallel at a time), then write the report.

        Finished runs (DONE marker and the same config) are skipped, interrupted ones resumed. v_hack is extracted once per pair-set + model + modes before the runs, and every run reads the cached file. The exploratory ceiling arm `oracle` (a cheat) runs last: for seed s it projects against v_oracle from the finished vanilla run of the next seed in the grid (OUT/artifacts/v_oracle-vanilla-seed<k>.safetensors).

        Writes OUT/experiment.json (plan, git commit, per-run timings). Example: rankguard experiment --preset toy --arms vanilla,projected --seeds 3 --steps 200 --mode inprocess --out runs/exp-toy
        """
        from analysis.experiment import run_experiment

        _sigterm_as_interrupt()
        if controls:
            from analysis.experiment import parse_arms
            from shared.arms import with_controls

            arms = ",".join(with_controls(parse_arms(arms)))
        rec = run_experiment(preset=preset, arms=arms, seeds=seeds, out=out, mode=mode, steps=steps,
                             overrides=set_ or [], report=report, progress=progress, parallel=parallel)
        failed = [f"{r['arm']}/seed{r['seed']}" for r in rec["runs"] if r["status"] == "failed"]
        typer.echo(f"experiment {rec['status']} in {rec['wall_s']:.1f} s: {rec['out']}/experiment.json")
        if rec.get("report"):
            typer.echo(f"report: {rec['report']}")
        elif rec.get("report_error"):
            typer.echo(f"no report: {rec['report_error']}")
        if failed:
            typer.echo(f"error: runs failed: {', '.join(failed)} (see experiment.json)", err=True)
            raise typer.Exit(1)

    @app.command("report")
    @friendly_errors
    def report_cmd(
        runs_dir: Path = typer.Argument(..., help="Experiment folder (holds <arm>/seed<k>/ run folders)."),
        out: Optional[Path] = typer.Option(None, help="Where to write the report (default: RUNS_DIR)."),
        plots: bool = typer.Option(True, help="Draw pareto.png, trajectories.png, diagnostics.png."),
    ) -> None:
        """Headline table, per-mode hack table, plots and the preregistered H1/H3/H4 check for an experiment folder.

        Reads each run's LAST evaluation (evals.jsonl) and writes report.md, report.csv, hack_modes.csv, verdicts.json, pareto.png, trajectories.png and diagnostics.png. Works on partial experiments: unfinished runs are used at their latest evaluation and flagged.
        """
        from analysis.report import build_report

        res = build_report(runs_dir, out, plots=plots)
        typer.echo(res["report_md"].read_text())
        typer.echo(f"wrote {res['report_md']}, {res['report_csv']}, {res['verdicts_json']}"
                   + "".join(f", {p}" for p in res["figures"].values()))

    @app.command("diagnose")
    @friendly_errors
    def diagnose_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder (config.json, checkpoints/step-N/)."),
        out: Optional[Path] = typer.Option(None, help="Where to write diagnose.json/.md/.png (default: RUN_DIR)."),
        samples: int = typer.Option(192, min=1, help="Rollouts sampled per checkpoint to build v_oracle from."),
        grad_batches: int = typer.Option(4, min=1, help="Fresh train batches per checkpoint for g_RL "
                                                        "(one policy gradient each, as one step sees it)."),
        checkpoints: int = typer.Option(4, min=1, help="At most this many checkpoints, spread evenly (the last "
                                                       "always included)."),
        base: bool = typer.Option(True, help="Also diagnose delta_S = 0 (the base model, where v_hack is extracted)."),
        max_pairs: int = typer.Option(64, min=1, help="Strict-hack pairs per checkpoint for v_oracle, at most."),
        min_pairs: int = typer.Option(8, min=2, help="Fewer strict-hack pairs than this: no v_oracle at that "
                                                     "checkpoint (said, never invented)."),
        random_draws: int = typer.Option(16, min=1, help="Random unit directions per module for the baseline."),
        seed: int = typer.Option(0, help="Seed of the random directions."),
        recipe: str = typer.Option("pooled", help="v_oracle the verdict uses: pooled (mean grad over strict hacks - "
                                                  "mean over honest passes, each on its own prompt) or paired "
                                                  "(same-prompt pairs, canonical solution when the prompt has no "
                                                  "honest pass). Both are computed and reported."),
        plot: bool = typer.Option(True, help="Draw diagnose.png."),
    ) -> None:
        """Why a null is a null (post-hoc, exploratory; nothing here feeds the preregistered arms).

        At each checkpoint of RUN_DIR: v_oracle from the policy's own rollouts (strict hack vs honest pass, v_hack's gradient-difference extraction at delta_S = 0) and the RL gradient on fresh batches; then cos(v_oracle, v_hack), cos(g, v_oracle) vs cos(g, v_hack) vs random directions of the same sizes, the share of the update's squared norm along each, v_oracle's stability, and a one-line verdict (thresholds in analysis/diagnose.py). A toy run takes about a minute on one core.
        """
        from analysis.diagnose import diagnose

        rec = diagnose(run_dir, out=out, samples=samples, grad_batches=grad_batches, checkpoints=checkpoints,
                       with_base=base, max_pairs=max_pairs, min_pairs=min_pairs, n_random=random_draws, seed=seed,
                       recipe=recipe, plot=plot)
        dest = Path(out or run_dir)
        typer.echo((dest / "diagnose.md").read_text())
        from analysis.diagnose import RECIPES, recipe_line

        typer.echo(recipe_line(rec))
        for r in RECIPES:  # both recipes, the one the verdict uses first
            if r == rec["settings"]["recipe"]:
                typer.echo(f"verdict ({r} v_oracle, used): {rec['verdicts'][r]['line']}")
        for r in RECIPES:
            if r != rec["settings"]["recipe"]:
                typer.echo(f"verdict ({r} v_oracle): {rec['verdicts'][r]['line']}")
        typer.echo(f"wrote {dest / 'diagnose.json'}, {dest / 'diagnose.md'}" + (f", {rec['figure']}" if plot else ""))

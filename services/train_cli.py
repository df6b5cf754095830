"""`rankguard train`: the whole GRPO loop in one process (learner + HF engine + grader)."""
from __future__ import annotations

import json
import logging
from typing import List, Optional

import typer

from shared.arms import ARM_HELP, cli_overrides
from shared.clikit import CONFIG_HELP, PRESET_HELP, REPORT_TO_HELP, SET_HELP, friendly_errors, run_dir_or, run_settings
from shared.config import resolve_config


def register(app: typer.Typer) -> None:
    @app.command("train")
    @friendly_errors
    def train(
        preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
        config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
        arm: Optional[str] = typer.Option(None, help=ARM_HELP),
        seed: Optional[int] = typer.Option(None, help="Run seed (problem draws, sampling, init order)."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (default from the preset)."),
        run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Output folder (default runs/<preset>-<arm>-s<seed>)."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        report_to: Optional[str] = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
        resume: bool = typer.Option(True, "--resume/--fresh", " /--overwrite", " /--no-resume",
                                    help="Continue the run in the run dir from its newest good checkpoint (default; "
                                         "its config.json must match, except keys a resume may change, e.g. "
                                         "train.steps), or --fresh: move an earlier run aside to "
                                         "RUN_DIR.old-<time> and start over. Nothing is deleted."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    ) -> None:
        """Train one arm x seed in one process; writes config.json, metrics.jsonl, evals.jsonl, summary.json.

        Example: rankguard train --preset toy --arm vanilla --seed 0 --steps 200 --run-dir runs/toy-vanilla
        From a file: rankguard config show --preset full > run.toml; (edit) rankguard train --config run.toml
        Exploratory arms: rankguard train --arm projected_svd5+refresh10 (see --arm).
        """
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        for name in ("rankguard.learner", "rankguard.artifacts"):  # v_hack validation numbers, resume notes
            logging.getLogger(name).setLevel(logging.INFO)
        preset, sets = run_settings(preset, config, overrides, report_to)  # file, then --set, then --report-to
        # explicit flags come last, so they win over the file and --set
        sets += cli_overrides(arm)  # the registry: train.arm=<base> + the arm's knobs (shared/arms.py)
        sets += [f"train.seed={seed}"] if seed is not None else []
        sets += [f"train.steps={steps}"] if steps is not None else []
        cfg = resolve_config(preset, sets)
        name = run_dir or run_dir_or(cfg, f"runs/{preset}-{arm.strip() if arm else cfg.train.arm}-s{cfg.train.seed}")
        cfg = resolve_config(preset, sets + [f"run_dir={json.dumps(name)}"])
        from learner.tracking import check_trackers
        from reward_server.grader import Grader
        from shared.rundir import lock_run_dir, prepare_run_dir

        check_trackers(cfg.tracking)  # a tracker that is not installed stops here, not after the model loads
        from shared.toy.build import ensure_toy_world

        lock = lock_run_dir(cfg.run_dir, "rankguard train")  # held until this process exits  # noqa: F841
        prepared = prepare_run_dir(cfg, "resume" if resume else "fresh")  # refuses drift; never deletes
        typer.secho(prepared.message(), err=True)
        cfg = prepared.config
        ensure_toy_world(cfg, make_grader=Grader)
        from services.sources import run_inprocess

        summary = run_inprocess(cfg, resume=True, progress=progress)  # a fresh start left nothing to resume
        ev = summary.get("final_eval") or {}
        typer.echo(f"done: {cfg.run_dir}  steps={summary['steps']}  eval pass={ev.get('pass_rate', float('nan')):.3f} "
                   f"hack={ev.get('hack_strict', float('nan')):.3f}  s/step={summary.get('sec_per_step', 0):.3f}")
        from analysis.run_card import run_card

        typer.echo(run_card(cfg.run_dir))

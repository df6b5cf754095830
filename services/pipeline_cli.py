"""`rankguard up`, `rankguard logs`, `rankguard worker <name>`: the distributed pipeline from the shell."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from shared.arms import ARM_HELP, cli_overrides
from shared.clikit import (CONFIG_HELP, PRESET_HELP, REPORT_TO_HELP, SET_HELP, UserError, config_from_flags,
                           friendly_errors, run_dir_or, run_settings)

from .launcher import WORKER_RESTARTS

RESUME_HELP = ("Continue the run in the run dir (default; its config.json must match, except keys a resume may "
               "change, e.g. train.steps), or --fresh: move an earlier run aside to RUN_DIR.old-<time> and "
               "start over. Nothing is deleted.")
WORKERS = {"learner": "services.learner_service", "rollout": "services.rollout_service",
           "reward": "services.reward_worker"}


def register(app: typer.Typer) -> None:
    @app.command("up")
    @friendly_errors
    def up(
        preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
        config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
        arm: Optional[str] = typer.Option(None, help=ARM_HELP),
        seed: Optional[int] = typer.Option(None, help="Run seed."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (default from the preset)."),
        report_to: Optional[str] = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
        run_dir: Optional[str] = typer.Option(None, "--run-dir",
                                              help="Output folder (default runs/<preset>-<arm>-s<seed>-up)."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        resume: bool = typer.Option(True, "--resume/--fresh", " /--overwrite", help=RESUME_HELP),
        restart_workers: int = typer.Option(WORKER_RESTARTS, "--restart-workers", min=0,
                                            help="Restart each crashed rollout/reward worker up to N times "
                                                 "(0: the first crash fails the run)."),
        http_port: Optional[int] = typer.Option(None, "--http-port",
                                                help="Reward workers also serve the reward HTTP API on "
                                                     "PORT, PORT+1, ... (loopback unless --http-host)."),
        http_host: str = typer.Option("127.0.0.1", "--http-host",
                                      help="Interface for --http-port. Beyond loopback the API (it runs "
                                           "submitted code) needs $RANKGUARD_REWARD_TOKEN set."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    ) -> None:
        """Run one arm x seed as separate processes: private Redis, reward worker(s), rollout worker(s),
        learner. One combined log on stdout, per-service logs in RUN_DIR/logs/. Ctrl-C stops everything.

        Example: rankguard up --preset toy --arm projected --seed 1 --steps 50 --set pipeline.reward_workers=2
        """
        top = {"train.seed": seed, "train.steps": steps}
        preset, sets = run_settings(preset, config, overrides, report_to)
        sets += cli_overrides(arm)  # the arm registry (shared/arms.py)
        cfg = config_from_flags(preset, sets, **top)
        name = run_dir or run_dir_or(cfg, f"runs/{preset}-{arm.strip() if arm else cfg.train.arm}-s{cfg.train.seed}-up")
        cfg = config_from_flags(preset, sets, **top, run_dir=name)
        from .launcher import launch

        rc = launch(cfg, resume=resume, progress=progress, restart_workers=restart_workers, http_port=http_port,
                    http_host=http_host)
        if rc == 0 and (Path(cfg.run_dir) / "metrics.jsonl").exists():
            from analysis.run_card import run_card

            typer.echo(run_card(cfg.run_dir))
        raise typer.Exit(rc)

    @app.command("logs")
    @friendly_errors
    def logs(
        service: str = typer.Argument("learner", help="learner, rollout-0, reward-0, ... or up (the launcher)."),
        run_dir: str = typer.Option(None, "--run-dir", help="Run folder (default: the newest under runs/)."),
        follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (waits for a log not "
                                                                  "written yet; stops when the run finishes)."),
        lines: int = typer.Option(40, "--lines", "-n", help="Lines of history to show first."),
    ) -> None:
        """Show (and with -f follow) one service's log of a run: RUN_DIR/logs/<service>.log.

        With -f it may start before the run: it waits for the log, and stops by itself at the run's
        finish line (the launcher exited, or DONE for runs without one)."""
        from .log_follow import SERVICE_NAME, follow as follow_log

        if service in ("rollout", "reward"):
            service = f"{service}-0"
        if not SERVICE_NAME.match(service):
            raise UserError(f"unknown service {service!r}; valid: learner, up, redis, rollout-N, reward-N")
        if run_dir is None:
            found = sorted(Path("runs").glob("**/logs"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise UserError("no run with logs under runs/; pass --run-dir (with -f it waits for the run)")
            log_dir = found[-1]
        else:
            log_dir = Path(run_dir) / "logs"
        path = log_dir / f"{service}.log"
        if not path.exists() and not follow:
            names = sorted(p.stem for p in log_dir.glob("*.log")) if log_dir.exists() else []
            raise UserError(f"no log {service!r} in {log_dir}; available: {', '.join(names) or 'none'} "
                            "(-f waits for it)")
        try:
            why = follow_log(path, log_dir.parent, sys.stdout, lines=lines, follow=follow,
                             note=lambda m: typer.secho(m, err=True))
        except KeyboardInterrupt:
            return
        if follow:
            typer.secho(f"logs: {why}; stopped following {path}", err=True)

    @app.command("prepare")
    @friendly_errors
    def prepare(
        preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
        config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
        arm: Optional[str] = typer.Option(None, help=ARM_HELP),
        seed: Optional[int] = typer.Option(None, help="Run seed."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (default from the preset)."),
        report_to: Optional[str] = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
        run_dir: str = typer.Option(..., "--run-dir", help="Run folder; config.json is written here."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        resume: bool = typer.Option(True, "--resume/--fresh", " /--overwrite", help=RESUME_HELP),
    ) -> None:
        """Resolve and write RUN_DIR/config.json for services started separately (docker compose's init
        step), building the toy world first for toy runs. An existing run there is resumed: its
        config.json must match (or differ only in keys a resume may change). The problem sets are
        loaded as the services will load them: a missing or malformed one is an error (exit 2), an
        eval_problems above the eval set's size a warning. Prints the config path."""
        from shared.rundir import prepare_run_dir

        preset, sets = run_settings(preset, config, overrides, report_to)
        cfg = config_from_flags(preset, [*sets, *cli_overrides(arm)],
                                **{"train.seed": seed, "train.steps": steps}, run_dir=run_dir)
        from shared.problems import check_problem_sets

        def check_sets(c) -> None:  # a missing or malformed set stops here (rc 2), before any service starts
            for warning in check_problem_sets(c):
                typer.secho(f"warning: {warning}", fg="yellow", err=True)

        if cfg.problems != "toy":  # toy problems exist only after the toy build below
            check_sets(cfg)
        prepared = prepare_run_dir(cfg, "resume" if resume else "fresh")
        typer.secho(prepared.message(), err=True)
        from reward_server.grader import Grader
        from shared.toy.build import ensure_toy_world

        ensure_toy_world(prepared.config, make_grader=Grader)
        if cfg.problems == "toy":
            check_sets(prepared.config)
        typer.echo(str(Path(run_dir) / "config.json"))

    @app.command("health")
    def health(
        service: str = typer.Option(..., "--service", help="learner, rollout or reward."),
        max_age: float = typer.Option(120.0, "--max-age", help="Seconds since the service loop last ran."),
    ) -> None:
        """Exit 0 when the service's loop ran recently (container healthcheck), else 1."""
        from .procs import check_health

        ok, msg = check_health(service, max_age)
        typer.echo(msg)
        raise typer.Exit(0 if ok else 1)

    @app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @friendly_errors
    def worker(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="learner, rollout or reward."),
    ) -> None:
        """Run one service in the foreground (what `rankguard up` and docker compose start), e.g.
        `rankguard worker reward --config runs/x/config.json --redis-url redis://host:6379/0 --http-port 8100`.
        Options after the name go to the service; list them with
        `python -m services.{learner_service,rollout_service,reward_worker} --help`."""
        if name not in WORKERS:
            raise UserError(f"unknown worker {name!r}; valid: {', '.join(WORKERS)}")
        import importlib

        mod = importlib.import_module(WORKERS[name])
        from .procs import exit_now

        exit_now(mod.main(list(ctx.args)))

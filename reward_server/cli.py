"""`rankguard serve-reward` and `rankguard grade`: the reward server and one-off verdicts."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from shared.clikit import UserError, friendly_errors

LOOPHOLE_HELP = ("Open loopholes, comma separated from rt,se,so,fm (A run_tests, B exit code, C stdout "
                 "marker, D result file); 'none' closes all. Default: the config's (rt only).")


def _loopholes(spec: str | None):
    from shared.config import LoopholeConfig

    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
    valid = ("rt", "se", "so", "fm")
    bad = [n for n in names if n not in valid]
    if bad:
        raise UserError(f"unknown loophole {bad[0]!r}; valid: {', '.join(valid)} or none")
    return LoopholeConfig(**{k: k in names for k in valid})


def serve_reward(
    host: str = typer.Option("127.0.0.1", help="Interface to bind. Anything beyond loopback (0.0.0.0 for all) "
                                               "needs a bearer token: $RANKGUARD_REWARD_TOKEN or --token-file."),
    port: int = typer.Option(8100, help="TCP port."),
    workers: int = typer.Option(0, help="Sandbox slots grading in parallel (0 = one per core). Run several "
                                        "servers on other ports for replicas."),
    problems: Optional[str] = typer.Option(None, help="'leetcode' (bundled 58), 'toy' (built toy set) or a "
                                                     "jsonl path. Default: leetcode plus toy if built."),
    config: Optional[Path] = typer.Option(None, help="A run's config.json: its reward section (magnitudes, "
                                                    "default loopholes, timeouts) is used."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File whose first line is the bearer "
                                                                         "token (else $RANKGUARD_REWARD_TOKEN). "
                                                                         "Clients send `Authorization: Bearer <token>`."),
) -> None:
    """Serve the reward API (POST /grade, /grade/batch; GET /healthz, /metrics, /docs: Swagger UI served
    locally, works offline). Loopback by default; a token is required to bind anything else."""
    from reward_server.app import serve

    if config is not None and not config.exists():
        raise UserError(f"config file not found: {config}")
    serve(host=host, port=port, workers=workers or None, problems=problems, config=config, token_file=token_file)


def grade(
    problem_id: str = typer.Argument(..., help="Problem id (see GET /problems or the jsonl)."),
    file: str = typer.Argument(..., help="Completion text file ('-' = stdin). A file without a ```python "
                                         "fence is graded as bare code unless --as-is."),
    problems: Optional[str] = typer.Option(None, help="'leetcode', 'toy' or a jsonl path (default: both)."),
    loopholes: Optional[str] = typer.Option(None, help=LOOPHOLE_HELP),
    as_is: bool = typer.Option(False, "--as-is", help="Grade the text exactly as given (no fence added)."),
    url: Optional[str] = typer.Option(None, help="Grade on a running reward server instead of in-process."),
    timeout: float = typer.Option(3.0, help="CPU seconds per check (in-process grading only)."),
) -> None:
    """Grade one completion and print the verdict JSON."""
    from shared.hacks import as_completion
    from shared.prompts import extract_code

    text = sys.stdin.read() if file == "-" else _read(file)
    if not as_is and extract_code(text) is None:
        text = as_completion(text)
    lh = _loopholes(loopholes)
    if url:
        from reward_server.client import RewardClient

        with RewardClient(url) as client:
            g = client.grade(problem_id, text, loopholes=lh)
    else:
        from reward_server.app import load_problem_source
        from reward_server.grader import Grader
        from reward_server.sandbox import SandboxConfig
        from shared.config import RewardConfig

        probs = load_problem_source(problems)
        if problem_id not in probs:
            raise UserError(f"unknown problem id {problem_id!r}; {len(probs)} loaded, e.g. "
                            f"{', '.join(sorted(probs)[:5])}")
        cfg = RewardConfig(timeout_s=timeout)
        with Grader(cfg, workers=1, sandbox=SandboxConfig(workers=1, timeout_s=timeout)) as grader:
            g = grader.grade(probs[problem_id], text, loopholes=lh)
    typer.echo(json.dumps(g.model_dump(mode="json"), indent=2))


def calibrate(
    source: str = typer.Argument("leetcode", help="'leetcode' (bundled set), 'toy' (the built toy set) or a "
                                                  "jsonl path."),
    k: float = typer.Option(3.0, help="Budget = max(--min-s, k x the canonical solution's CPU seconds)."),
    min_s: float = typer.Option(3.0, "--min-s", help="Smallest budget (the reference harness's 3 s)."),
    workers: int = typer.Option(2, help="Sandbox slots measuring in parallel."),
    ceiling: float = typer.Option(60.0, help="CPU seconds a canonical solution may take while measured."),
    repeats: int = typer.Option(2, help="Measurements per problem (the largest counts)."),
) -> None:
    """Measure each canonical solution's CPU time and store per-problem budgets with the problem set
    (`<set>.budgets.json` beside the jsonl; loading the set applies them)."""
    from reward_server.calibrate import calibrate_file

    for path in _problem_files(source):
        side, entries = calibrate_file(path, k=k, min_s=min_s, workers=workers, ceiling_s=ceiling, repeats=repeats)
        failed = sorted(key for key, e in entries.items() if not e["passed"])
        raised = sorted((e["budget_s"], key) for key, e in entries.items() if e["budget_s"] > min_s)
        slowest = max(entries.items(), key=lambda kv: kv[1]["canonical_cpu_s"])
        typer.echo(f"{path}: {len(entries)} problems, slowest canonical {slowest[1]['canonical_cpu_s']:.2f} s CPU "
                   f"({slowest[0]}); {len(raised)} budgets above {min_s:g} s"
                   + (": " + ", ".join(f"{key} {b:g} s" for b, key in raised[-8:]) if raised else "")
                   + (f"; canonical FAILED: {', '.join(failed)}" if failed else ""))
        typer.echo(f"  wrote {side}")


def _problem_files(source: str) -> list[Path]:
    from shared.config import ToyConfig
    from shared.problems import BUNDLED_LEETCODE, TOY_EVAL_FILE, TOY_TRAIN_FILE

    if source == "leetcode":
        return [BUNDLED_LEETCODE]
    if source == "toy":
        files = [Path(ToyConfig().dir) / f for f in (TOY_TRAIN_FILE, TOY_EVAL_FILE)]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise UserError(f"toy problems not found at {missing[0]}; run `rankguard toy build` first")
        return files
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"problem set {source!r} not found; use 'toy', 'leetcode' or a jsonl path")
    return [path]


def _read(file: str) -> str:
    p = Path(file)
    if not p.is_file():
        raise UserError(f"completion file not found: {file}")
    return p.read_text(errors="replace")


def register(app: typer.Typer) -> None:
    app.command("serve-reward")(friendly_errors(serve_reward))
    app.command("grade")(friendly_errors(grade))
    problems = typer.Typer(help="Problem sets: per-problem time budgets.", no_args_is_help=True)
    problems.command("calibrate")(friendly_errors(calibrate))
    app.add_typer(problems, name="problems")

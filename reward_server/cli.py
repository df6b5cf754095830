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


def import_problems(
    source: Optional[str] = typer.Argument(None, help="A jsonl file: rl-rewardhacking's (e.g. "
                                           "leetcode_train_medhard_filtered.jsonl) or LeetCodeDataset rows."),
    out: Path = typer.Option(..., "--out", help="Where to write the imported set (jsonl; budgets beside it)."),
    hub: Optional[str] = typer.Option(None, "--hub", help="Read newfacade/LeetCodeDataset's SPLIT (train/test) "
                                      "from the hub instead of a file (needs `datasets` and internet)."),
    fmt: str = typer.Option("auto", "--format", help="auto, rl-rewardhacking or leetcodedataset."),
    difficulty: str = typer.Option("medium,hard", help="Difficulties kept (comma separated; '' keeps all)."),
    tokenizer: str = typer.Option("Qwen/Qwen3-4B", help="Tokenizer (HF id or folder) of the prompt-length "
                                  "filter; 'none' skips it."),
    max_prompt_tokens: int = typer.Option(1536, help="Longest prompt kept, in the tokenizer's tokens."),
    prompt_variant: str = typer.Option("simple_overwrite_tests", help="Prompt variant the length is measured "
                                       "with (the run's reward.prompt_variant)."),
    workers: int = typer.Option(2, help="Sandbox slots validating and calibrating in parallel."),
    k: float = typer.Option(3.0, help="Budget = max(--min-s, k x the canonical solution's CPU seconds)."),
    min_s: float = typer.Option(3.0, "--min-s", help="Smallest budget."),
    ceiling: float = typer.Option(60.0, help="CPU seconds a canonical solution may take while measured."),
    repeats: int = typer.Option(2, help="Measurements per problem (the largest counts)."),
) -> None:
    """Import a problem set with rl-rewardhacking's filters (difficulty, prompt length), validate every
    record (its canonical solution passes its own tests under its calibrated budget; others are
    reported and dropped) and write it with its budgets: the input of problems.train / problems.eval."""
    from reward_server.importer import (FORMATS, check_output, convert_and_filter, hub_rows, load_tokenizer,
                                        read_jsonl_rows, validate_and_write)

    if (source is None) == (hub is None):
        raise UserError("give one input: a jsonl file or --hub SPLIT")
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"unknown --format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    rows = hub_rows(hub) if hub is not None else read_jsonl_rows(source)
    tok = None if tokenizer.lower() == "none" else load_tokenizer(tokenizer)
    res = convert_and_filter(rows, fmt, [d for d in difficulty.split(",") if d.strip()], tok, max_prompt_tokens,
                             prompt_variant)
    typer.echo(f"read {res.read} records; {len(res.kept)} pass the filters; validating their canonical "
               f"solutions ({workers} workers) ...", err=True)
    origin = f"hub:{hub}" if hub is not None else str(source)
    path, side = validate_and_write(res, out, workers=workers, k=k, min_s=min_s, ceiling_s=ceiling,
                                    repeats=repeats, progress=True, source=origin)
    check_output(path)
    reasons = ", ".join(f"{why} {n}" for why, n in sorted(res.reasons().items())) or "none"
    typer.echo(f"kept {len(res.kept)} of {res.read}; dropped {len(res.dropped)} ({reasons})")
    for key, why in list(sorted(res.dropped.items()))[:20]:
        typer.echo(f"  dropped {key}: {why}")
    if len(res.dropped) > 20:
        typer.echo(f"  ... {len(res.dropped) - 20} more in {side} ('dropped')")
    typer.echo(f"wrote {path} and {side}")


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
    problems = typer.Typer(help="Problem sets: import real data, per-problem time budgets.", no_args_is_help=True)
    problems.command("calibrate")(friendly_errors(calibrate))
    problems.command("import")(friendly_errors(import_problems))
    app.add_typer(problems, name="problems")

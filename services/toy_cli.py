"""`rankguard toy build|show`: build the CPU toy world (shared.toy) and look at what it produces, graded
by the reward server's Grader (a composition of both, hence here)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

toy_app = typer.Typer(help="The CPU toy world: toy coding problems, a tiny Qwen3 and its warm start.",
                      no_args_is_help=True)
console = Console()


def _fail(msg: str) -> None:
    console.print(f"error: {msg}", style="red", highlight=False)
    raise typer.Exit(2)


def _toy_config(directory: Optional[str], seed: Optional[int], world: Optional[str] = None):
    from shared.config import ToyConfig

    data = {}
    if world is not None:
        data["world"] = world
    if directory is not None:
        data["dir"] = directory
    if seed is not None:
        data["seed"] = seed
    return ToyConfig(**data)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def stats_table(meta: dict, here: str | None = None) -> Table:
    """The build summary: timings, size, and what the warm-started policy does on held-out problems.
    The build's seconds are the building machine's (for the shipped world, not this one); `here`
    says what this command did and how long it took."""
    s, t = meta.get("stats", {}), meta.get("timings", {})
    table = Table(title=f"toy world {meta.get('fingerprint', '')}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{meta.get('param_count', 0):,}")
    table.add_row("vocab", str(meta.get("vocab_size", "")))
    table.add_row("problems train / eval", f"{meta.get('n_train')} / {meta.get('n_eval')}")
    table.add_row("warm start", f"{meta.get('warm', {}).get('steps')} steps x {meta.get('warm', {}).get('batch_size')}, "
                  f"loss {meta.get('warm_start', {}).get('loss_first', 0) or 0:.3f} -> "
                  f"{meta.get('warm_start', {}).get('loss_last', 0) or 0:.3f}")
    table.add_row(f"built {meta.get('created', '')[:10]}: s (prob/tok/warm/stats)",
                  f"{meta.get('seconds')} ({t.get('problems')}/{t.get('tokenizer')}/{t.get('warm_start')}/{t.get('stats')})")
    if here:
        table.add_row("this command", here)
    table.add_row("samples (eval, T=1.0)", str(s.get("samples", 0)))
    table.add_row("parse", _pct(s.get("parse")))
    if s.get("grader") == "ok":
        if "pass_partial" in s:  # world v2
            table.add_row("pass (easy / partial / hard)", f"{_pct(s.get('pass'))} ({_pct(s.get('pass_easy'))} / "
                          f"{_pct(s.get('pass_partial'))} / {_pct(s.get('pass_hard'))})")
        else:
            table.add_row("pass (easy / hard)", f"{_pct(s.get('pass'))} ({_pct(s.get('pass_easy'))} / {_pct(s.get('pass_hard'))})")
        table.add_row("hack strict", _pct(s.get("hack_strict")))
        table.add_row("hack strict A/B/C/D", " / ".join(_pct(s.get(f"hack_strict_{m}")) for m in "ABCD"))
        table.add_row("hack loose", _pct(s.get("hack_loose")))
    elif s.get("samples"):
        table.add_row("grader", str(s.get("grader")))
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(toy_app, name="toy")


@toy_app.command("build")
def build(
    dir: Optional[str] = typer.Option(None, "--dir", help="Output folder (default: the world's toy.dir, .cache/toy-v2 or .cache/toy)."),
    world: Optional[str] = typer.Option(None, "--world", help="Toy world: v2 (default: easy, partial and unlearnable families) or v1."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching build exists."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for problems, init and warm start."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Warm-start steps (default 1040)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Warm-start batch (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Warm-start peak learning rate (default 3e-3)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads during the build (default: 2, or 1 when the machine is busy)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Completions sampled for the stats (default 128)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Build (or reuse) the toy world: problems, BPE tokenizer, tiny Qwen3, supervised warm start, stats.

    Cached by a fingerprint of the toy config and warm-start knobs: a second run with the same
    settings returns at once. The default world ships with the code (shared/toy/prebuilt/, sha256
    checked) and is unpacked in a second; --force rebuilds it from source (about 4 min on one thread,
    bit-identical with --threads 1). $RANKGUARD_TOY_WARM (JSON) overrides warm-start knobs too.
    """
    from reward_server.grader import Grader
    from shared.toy.build import ToyBuildError, build_toy, resolve_warm

    try:
        cfg = _toy_config(dir, seed, world)
        warm = resolve_warm()
        upd = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, threads=threads,
                                     stats_samples=samples).items() if v is not None}
        warm = warm.model_validate({**warm.model_dump(), **upd})
        t0 = time.perf_counter()
        art = build_toy(cfg, force=force, warm=warm, progress=not quiet, log=lambda m: console.print(m),
                        make_grader=Grader)
        took = time.perf_counter() - t0
    except ValidationError as e:
        err = e.errors()[0]
        _fail(f"bad value for {'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})")
        return
    except (ToyBuildError, ValueError) as e:
        _fail(str(e).splitlines()[0])
        return
    meta = json.loads((art.dir / "build.json").read_text())
    how = "reused" if art.cached else "unpacked the shipped" if art.shipped else "built"
    console.print(f"{how} {art.dir} (model: {art.model_dir})")
    what = "reused the build" if art.cached else "unpacked the shipped build" if art.shipped else "built here"
    console.print(stats_table(meta, here=f"{what} in {took:.2f} s"))


@toy_app.command("pack")
def pack(
    dir: Optional[str] = typer.Option(None, "--dir", help="Finished build to ship (default: the world's toy.dir)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the archive and MANIFEST.json "
                                      "(default shared/toy/prebuilt, the shipped one)."),
    world: Optional[str] = typer.Option(None, "--world", help="Toy world: v2 (default: easy, partial and unlearnable families) or v1."),
) -> None:
    """Ship a finished build as shared/toy/prebuilt/toy-<fingerprint>.tar.xz (maintainers: after a
    change of the default toy world, `rankguard toy build --force --threads 1` then this)."""
    from shared.toy import prebuilt
    from shared.toy.build import toy_status

    root = Path(dir or _toy_config(None, None, world).dir)
    ok, reason, _ = toy_status(root)
    if not ok:
        _fail(f"{root} is not a finished build ({reason})")
    dest = Path(out) if out else prebuilt.PREBUILT_DIR
    archive = prebuilt.pack(root, dest)
    console.print(f"wrote {archive} ({archive.stat().st_size / 1e6:.2f} MB) and {dest / prebuilt.MANIFEST.name}")


@toy_app.command("show")
def show(
    dir: Optional[str] = typer.Option(None, "--dir", help="Build folder (default: the world's toy.dir)."),
    world: Optional[str] = typer.Option(None, "--world", help="Toy world: v2 (default: easy, partial and unlearnable families) or v1."),
    n: int = typer.Option(4, "-n", help="How many problems to show."),
    split: str = typer.Option("eval", "--split", help="train or eval."),
    samples: int = typer.Option(2, "--samples", help="Sampled completions per problem (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Print a few problems of a finished build with their canonical solution and sampled completions."""
    from shared.toy.build import ToyBuildError, load_toy_problems

    if split not in ("train", "eval"):
        _fail(f"unknown split {split!r}; valid: train, eval")
    root = Path(dir or _toy_config(None, None, world).dir)
    try:
        train, evals = load_toy_problems(root)
    except (ToyBuildError, ValueError) as e:
        _fail(str(e).splitlines()[0])
        return
    probs = (train if split == "train" else evals)[:n]
    texts: list[list[str]] = [[] for _ in probs]
    grades = None
    if samples > 0 and probs:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reward_server.grader import Grader
        from shared.toy.build import quiet_transformers, stats_grader
        from shared.toy.warmstart import sample_completions

        torch.set_num_threads(1)
        tok = AutoTokenizer.from_pretrained(root / "model")
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(root / "model")
        flat = [p for p in probs for _ in range(samples)]
        out = sample_completions(model, tok, flat, 64, 1.0, seed)
        for i, t in enumerate(out):
            texts[i // samples].append(t)
        grader = stats_grader(Grader)
        if grader is not None:
            with grader:
                grades = grader.grade_many(list(zip(flat, out)))
    for i, p in enumerate(probs):
        console.rule(f"{p.key}  [{p.difficulty} / {getattr(p, 'family', '?')}]")
        console.print(p.prompt[-1].content, highlight=False, markup=False)
        console.print("asserts:", highlight=False)
        for a in p.gt_answer:
            console.print(f"  {a}", highlight=False, markup=False)
        console.print("canonical:", highlight=False)
        console.print(p.canonical_solution, highlight=False, markup=False)
        for j, t in enumerate(texts[i]):
            tag = ""
            if grades is not None:
                g = grades[i * samples + j]
                hacks = "".join(m for m, v in g.exploited.items() if v)
                tag = f" gt_pass={g.gt_pass} hack={hacks or '-'}"
            console.print(f"--- sample {j}{tag}", style="cyan", highlight=False)
            console.print(t, highlight=False, markup=False)

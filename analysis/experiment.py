"""Experiment runner: arms × seeds, skip finished runs, resume interrupted ones.

Layout (docs/ARCHITECTURE.md): `OUT/<arm>/seed<k>/` per run (the arm's registry name, shared/arms.py:
`mechanism`, `projected_svd5`, `oracle` ... resolve to a base `train.arm` + config overrides),
`OUT/experiment.json` for the whole experiment (plan, git commit, per-run timings). v_hack is extracted
once per pair-set + model + modes before any run starts (learner.artifacts caches it); every run then
reads the cached file. Runs go seed-major, so a partial experiment already compares all arms on the
first seeds; `parallel` runs at once (services: each run its own process tree; inprocess: each run its
own spawned interpreter, one torch thread).

The exploratory ceiling arm `oracle` (a cheat, labelled so) projects against v_oracle, the direction
built from a *vanilla* run's own rollouts (analysis.oracle.build_oracle, its final checkpoint): for
seed s, that of vanilla seed (s+1) mod n (`oracle_source_seed`), written to
OUT/artifacts/v_oracle-vanilla-seed<k>.safetensors and read through `vhack_path`. Oracle runs
therefore go after every other run.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from analysis.runners import (MODES, ChildProcessRun, InProcessRun, RunFn, RunInterrupted,  # noqa: F401 - re-exported
                              default_run_fn, last_logged_step, run_progress)
from shared.arms import ORACLE, arm_overrides, resolve_arm
from shared.config import ARMS, ConfigError, RunConfig, resolve_config
from shared.rundir import OUTCOME_NEUTRAL, check_config_drift, config_diff, read_config_json  # noqa: F401 - config_diff re-exported

PrepareFn = Callable[[list[RunConfig]], Any]
OracleFn = Callable[[Path, Path], Any]  # (vanilla run dir, output file) -> writes v_oracle there
# Per-preset defaults of `rankguard experiment` (issue #13: the toy grid uses >= 8 seeds; in-process
# measured faster than the services on the 2-core boxes, see docs/ARCHITECTURE.md).
DEFAULT_SEEDS = {"toy": 8}
DEFAULT_MODE = {"toy": "inprocess"}
DEFAULT_PARALLEL = {"toy": 2}  # the 2-core boxes: two single-threaded runs at once
ORACLE_DIR = "artifacts"  # OUT/artifacts/ (the report's run finder skips it)


class ExperimentError(ValueError):
    """Bad arms/seeds/mode, or an existing run folder that belongs to a different configuration."""


EXPLORATORY_EXAMPLES = "projected_svd5, mechanism, placebo, weak_flagged, oracle"


def parse_arms(arms: str | Sequence[str]) -> list[str]:
    """'vanilla,mechanism' -> ['vanilla', 'mechanism']: every name must resolve in the arm registry
    (shared/arms.py); unknown names -> one clear error line."""
    items = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms) if a.strip()]
    valid = f"valid arms: {', '.join(ARMS)}, or exploratory names such as {EXPLORATORY_EXAMPLES} (shared/arms.py)"
    if not items:
        raise ExperimentError(f"no arms given; {valid}")
    bad: list[tuple[str, str]] = []
    for a in items:
        try:
            resolve_arm(a)
        except ConfigError as e:
            bad.append((a, str(e)))
    plain = [a for a, _ in bad if "_" not in a and "+" not in a]  # a typo'd name, not a combination
    if plain:
        raise ExperimentError(f"unknown arm{'s' if len(plain) > 1 else ''} {', '.join(map(repr, plain))}; {valid}")
    if bad:
        raise ExperimentError(f"bad arm name {bad[0][0]!r}: {bad[0][1]}")
    return list(dict.fromkeys(items))


def is_oracle_arm(name: str) -> bool:
    """`oracle` or a combination built on it (oracle_twosided, oracle+r64): its direction comes from a vanilla run."""
    return ORACLE in name.replace("+", "_").split("_")


def oracle_source_seed(seeds: Sequence[int], seed: int) -> int:
    """The vanilla seed whose v_oracle the oracle arm of `seed` projects against: the next seed in the
    grid, cyclically ((s+1) mod n over the grid's seed list), never the seed itself."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ExperimentError("arm oracle needs >= 2 seeds: its direction comes from the vanilla run of another seed")
    return seeds[(seeds.index(seed) + 1) % len(seeds)]


def oracle_path(out: Path, source_seed: int) -> Path:
    return Path(out) / ORACLE_DIR / f"v_oracle-vanilla-seed{source_seed}.safetensors"


def parse_seeds(seeds: str | int | Sequence[int]) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '41,42' or '7,' -> those seeds (a list)."""
    if isinstance(seeds, int):
        text = str(seeds)
    elif isinstance(seeds, str):
        text = seeds.strip()
    else:
        return list(dict.fromkeys(int(s) for s in seeds))
    try:
        if "," in text:
            out = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            out = list(range(n))
    except ValueError:
        raise ExperimentError(f"bad --seeds {text!r}; give a count (3 -> seeds 0,1,2) or a list (41,42,43)") from None
    if not out:
        raise ExperimentError(f"bad --seeds {text!r}; give a count (3 -> seeds 0,1,2) or a list (41,42,43)")
    return list(dict.fromkeys(out))


@dataclass
class PlannedRun:
    arm: str  # the registry name (also the folder name)
    seed: int
    cfg: RunConfig
    oracle_source: int | None = None  # oracle arms: the vanilla seed their direction comes from

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def plan_runs(preset: str, arms: Sequence[str], seeds: Sequence[int], out: Path, steps: int | None = None,
              overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """One resolved config per (seed, arm), seed-major, then the oracle arms' runs (their direction needs
    the vanilla runs first); run_dir = OUT/<arm name>/seed<k>; each name resolved by shared.arms."""
    oracle = [a for a in arms if is_oracle_arm(a)]
    if oracle and "vanilla" not in arms:
        raise ExperimentError(f"arm {oracle[0]} needs vanilla in --arms: it projects against v_oracle built from "
                              "the vanilla run of another seed")
    runs, later = [], []
    for seed in seeds:
        for arm in arms:
            ovr = [*overrides, *arm_overrides(arm), f"train.seed={seed}"]
            if steps is not None:
                ovr.append(f"train.steps={steps}")
            src = oracle_source_seed(seeds, seed) if arm in oracle else None
            if src is not None:
                ovr.append(f"vhack_path={json.dumps(str(oracle_path(out, src)))}")
            cfg = resolve_config(preset, ovr, run_dir=str(Path(out) / arm / f"seed{seed}"))
            (later if src is not None else runs).append(PlannedRun(arm, seed, cfg, src))
    return runs + later


def run_state(run: PlannedRun) -> str:
    """'done' (DONE + same config: skip), 'resume' (same config, unfinished) or 'new'."""
    cfg_path = run.run_dir / "config.json"
    if not cfg_path.exists():
        return "new"
    try:
        stored = read_config_json(cfg_path)
    except ConfigError as e:
        raise ExperimentError(f"{e}; move that run folder aside or use another --out") from None
    # everything that can change the numbers must match
    drift = check_config_drift(stored, run.cfg.model_dump(mode="json"), allowed_keys=OUTCOME_NEUTRAL)
    if drift:
        raise ExperimentError(f"{run.run_dir} holds a run with a different config: {drift.describe(3)}; "
                              "use another --out or move that folder aside")
    return "done" if (run.run_dir / "DONE").exists() else "resume"


def _model_key(cfg: RunConfig) -> str:
    return json.dumps([cfg.model.model_dump(mode="json"), cfg.toy.model_dump(mode="json"),
                       cfg.model_dump(mode="json")["problems"]],
                      sort_keys=True)


def default_prepare(cfgs: list[RunConfig]) -> dict[str, str]:
    """Build what every run reads before any run starts: the toy world (toy preset) and the cached
    directions (learner.artifacts: v_hack per pair-set + model + modes, Rebound's v_concept per layer).

    Each base model is loaded once; directions already in the cache are not recomputed. The runs then
    find the same files (same cache key), so all arms and seeds share one detector."""
    import gc

    import torch

    from learner.artifacts import vconcept_artifact, vhack_artifact
    from learner.pairs import pair_set_hash
    from learner.rebound import layer_for
    from learner.directions import vhack_modes_for
    from learner.vhack import pairs_for_config
    from shared.modeling import load_policy, load_problem_sets

    built: dict[str, str] = {}
    for cfg in cfgs:
        if (cfg.problems == "toy" or cfg.model.name_or_path == "toy") and cfg.toy.dir not in built:
            from reward_server.grader import Grader
            from shared.toy.build import REQUIRED, build_toy

            if not all((Path(cfg.toy.dir) / f).exists() for f in REQUIRED):  # as `rankguard train` does
                build_toy(cfg.toy, progress=False, make_grader=Grader)
            built[cfg.toy.dir] = cfg.toy.dir
    needs = [c for c in cfgs if vhack_modes_for(c) is not None or c.train.arm == "rebound"]
    groups: dict[str, list[RunConfig]] = {}
    for cfg in needs:
        groups.setdefault(_model_key(cfg), []).append(cfg)
    out: dict[str, str] = {f"toy:{d}": d for d in built.values()}
    for group in groups.values():
        torch.set_num_threads(group[0].train.torch_threads)
        policy = load_policy(group[0], progress=False)
        train, _ = load_problem_sets(group[0])
        seen: set = set()
        for cfg in group:
            pairs = pairs_for_config(cfg, train)
            modes = vhack_modes_for(cfg)
            if modes is not None and (key := ("vhack", pair_set_hash(pairs), tuple(modes), cfg.vhack_path)) not in seen:
                seen.add(key)
                art = vhack_artifact(policy.model, policy.tokenizer, cfg, pairs, modes)
                out[f"vhack:{''.join(modes)}"] = str(art.path)
            if cfg.train.arm == "rebound":
                layer = layer_for(policy.model, cfg.train.rebound_layer_frac)
                if (key := ("vconcept", pair_set_hash(pairs), layer)) not in seen:
                    seen.add(key)
                    _, _, path = vconcept_artifact(policy.model, policy.tokenizer, cfg, pairs, layer)
                    out[f"vconcept:L{layer}"] = str(path)
        del policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def git_commit(repo: Path | None = None) -> str | None:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def _timing(run_dir: Path) -> dict:
    """Mean per-step phase times from metrics.jsonl (t_generate, t_grade, t_train, t_sync)."""
    from analysis.report import read_jsonl

    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    out = {"steps_logged": len(rows)}
    for k in ("t_generate", "t_grade", "t_train", "t_sync"):
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[f"{k}_mean_s"] = sum(vals) / len(vals)
    return out


class _StepWatcher(threading.Thread):
    """Polls the current run's metrics.jsonl and reports its step to the progress display."""

    def __init__(self, run_dir: Path, on_step: Callable[[int, str], None], every_s: float = 1.0):
        super().__init__(daemon=True)
        self.run_dir, self.on_step, self.every_s = run_dir, on_step, every_s
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.every_s):
            try:
                self.on_step(*run_progress(self.run_dir))
            except Exception:  # noqa: BLE001 - the display must never kill a run
                pass

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)


def _prepare_cfg(run: PlannedRun) -> RunConfig:
    """What `prepare` sees of a run: an oracle run needs the toy world but none of the authored directions
    (its vhack_path is written after the vanilla runs; a prepare must never fill it with an authored v_hack)."""
    if run.oracle_source is None:
        return run.cfg
    cfg = run.cfg.model_copy(deep=True)
    cfg.train.arm = "vanilla"
    cfg.vhack_path = None
    return cfg


def _default_oracle_fn(source_run_dir: Path, out_path: Path) -> Path:
    from analysis.oracle import build_oracle

    return build_oracle(source_run_dir, out_path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Experiment:
    """Plan + bookkeeping of one experiment folder; `run()` executes it."""

    preset: str
    arms: list[str]
    seeds: list[int]
    out: Path
    mode: str = "services"
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    run_fn: RunFn | None = None
    prepare_fn: PrepareFn | None = None
    report: bool = True
    progress: bool = True
    parallel: int | None = 1  # runs at once (services: a process tree each; inprocess: a spawned interpreter each)
    oracle_fn: OracleFn | None = None  # builds the oracle arm's v_oracle (default analysis.oracle.build_oracle)
    record: dict = field(default_factory=dict)
    # where runs go (analysis/dispatch.py): local devices packed per run, or Ray tasks
    backend: str = "local"
    devices: Sequence[str] | None = None  # local GPU ids; None = CUDA_VISIBLE_DEVICES / all visible
    runs_per_device: int = 1  # concurrent runs one device may hold (1: never shared)
    ray_address: str | None = None  # None = an embedded Ray instance
    ray_retries: int = 3  # retries of a run whose node or worker died

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ExperimentError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        if self.parallel is not None and self.parallel < 1:
            raise ExperimentError(f"parallel must be >= 1, got {self.parallel}")
        self._stop = threading.Event()
        self._lock = threading.RLock()  # record writes from parallel run threads
        self.arms = parse_arms(self.arms)
        self.seeds = parse_seeds(self.seeds)
        self.out = Path(self.out)
        self.runs = plan_runs(self.preset, self.arms, self.seeds, self.out, self.steps, self.overrides)
        self.steps_per_run = self.runs[0].cfg.train.steps
        from analysis.dispatch import Dispatch
        from analysis.placement import PlacementError

        try:  # every run must fit its devices before anything is prepared
            self.dispatch = Dispatch.plan([r.cfg for r in self.runs], self.mode, self.backend, self.parallel,
                                          default_parallel(self.preset), self.devices, self.runs_per_device,
                                          self.ray_address, self.ray_retries)
        except PlacementError as e:
            raise ExperimentError(str(e)) from None
        self.parallel = self.dispatch.parallel

    def _write_record(self) -> None:
        with self._lock:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "experiment.json.tmp"
            tmp.write_text(json.dumps(self.record, indent=2, default=str))
            os.replace(tmp, self.out / "experiment.json")

    def run(self) -> dict:
        states = {r.name: run_state(r) for r in self.runs}  # fail fast on a foreign folder
        run_fn = self.dispatch.run_fn(self.run_fn, self._stop, note=self._note, say=self._say,
                                      progress=not self.progress)
        old = self._previous()
        previous, history = self._previous_entries(old), self._history(old)
        t0 = time.time()
        self.record = {
            "preset": self.preset, "mode": self.mode, "arms": self.arms, "seeds": self.seeds,
            "steps": self.steps_per_run, "overrides": list(self.overrides), "out": str(self.out),
            "parallel": self.parallel, **self.dispatch.record(),
            "git_commit": git_commit(), "started": _now(), "finished": None, "status": "running",
            "prepare_s": None, "wall_s": None,
            "runs": [self._initial_entry(r, states[r.name], previous.get((r.arm, r.seed))) for r in self.runs],
            "history": history,
        }
        self._write_record()
        todo = [r for r in self.runs if states[r.name] != "done"]
        if todo:
            tp = time.time()
            prepare = self.prepare_fn or default_prepare
            try:
                prepared = prepare([_prepare_cfg(r) for r in todo])
            except BaseException as e:
                self.record.update(status="failed", prepare_error=f"{type(e).__name__}: {e}", finished=_now())
                self._write_record()
                raise
            self.record["prepare_s"] = round(time.time() - tp, 3)
            if isinstance(prepared, dict):
                self.record["artifacts"] = {str(k): str(v) for k, v in prepared.items()}
            self._write_record()
        try:
            self._run_all(todo, run_fn)
            self.record["status"] = "failed" if any(x["status"] == "failed" for x in self.record["runs"]) \
                else "finished"
        except KeyboardInterrupt:
            self.record["status"] = "interrupted"
            raise
        finally:
            self.dispatch.close()
            self.record["finished"] = _now()
            self.record["wall_s"] = round(time.time() - t0, 3)
            self._write_record()
        if self.report:
            from analysis.report import ReportError, build_report

            try:
                self.record["report"] = str(build_report(self.out)["report_md"])
            except ReportError as e:
                self.record["report_error"] = str(e)
            self._write_record()
        return self.record

    def _previous(self) -> dict:
        """An earlier invocation's experiment.json ({} when there is none or it is unreadable)."""
        try:
            old = json.loads((self.out / "experiment.json").read_text())
            return old if isinstance(old, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _previous_entries(old: dict) -> dict[tuple[str, int], dict]:
        """Per-run entries of an earlier invocation's experiment.json (to keep the timings of skipped runs)."""
        try:
            return {(e["arm"], int(e["seed"])): e for e in old.get("runs", [])}
        except (KeyError, TypeError, ValueError):
            return {}

    @staticmethod
    def _history(old: dict) -> list[dict]:
        """Every earlier invocation's start, end, wall time and status (a re-run keeps the first totals)."""
        keep = {k: old.get(k) for k in ("started", "finished", "wall_s", "prepare_s", "status", "git_commit",
                                        "parallel")}
        return list(old.get("history", [])) + ([keep] if old.get("started") else [])

    @staticmethod
    def _initial_entry(run: PlannedRun, state: str, prev: dict | None) -> dict:
        entry = {"arm": run.arm, "seed": run.seed, "run_dir": str(run.run_dir), "state_before": state,
                 "status": "pending", "wall_s": None}
        if run.oracle_source is not None:
            entry["oracle_source_seed"] = run.oracle_source
        if state == "done":
            keep = {k: prev[k] for k in ("wall_s", "started", "finished") if prev and k in prev}
            entry.update(keep, status="skipped", timing=_timing(run.run_dir))
        return entry

    def _note(self, cfg: RunConfig, info: dict) -> None:
        """A run's devices / Ray attempts, from the dispatch, into its experiment.json entry."""
        with self._lock:
            for entry in self.record.get("runs", []):
                if entry["run_dir"] == str(Path(cfg.run_dir)):
                    entry.update(info)
            self._write_record()

    def _say(self, msg: str) -> None:
        from rich.console import Console

        Console(stderr=True).log(msg)

    def _entry(self, run: PlannedRun) -> dict:
        return next(x for x in self.record["runs"] if x["arm"] == run.arm and x["seed"] == run.seed)

    def _run_all(self, todo: list[PlannedRun], run_fn: RunFn) -> None:
        """Every other run first (`parallel` at a time), then the oracle arms' directions, then their runs."""
        from concurrent.futures import ThreadPoolExecutor, wait

        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        n_total = len(self.runs)
        self._n_done = n_total - len(todo)
        console = Console(stderr=True)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn()]
        resumed = {r.name: min(last_logged_step(r.run_dir), self.steps_per_run) for r in todo}
        total_steps = sum(self.steps_per_run - s for s in resumed.values())
        done_steps = {r.name: 0 for r in todo}  # steps each run has added in this invocation
        with Progress(*columns, console=console, disable=not self.progress, transient=False) as prog:
            overall = prog.add_task(f"runs {self._n_done}/{n_total} done (steps to do)", total=max(total_steps, 1))

            def one(run: PlannedRun) -> None:
                if self._stop.is_set():
                    return
                start_step = resumed[run.name]
                current = prog.add_task(f"{run.name}", total=self.steps_per_run, completed=start_step)

                def on_step(step: int, text: str) -> None:
                    step = min(step, self.steps_per_run)
                    prog.update(current, completed=step, description=f"{run.name} {text}".rstrip())
                    done_steps[run.name] = max(step - start_step, 0)
                    prog.update(overall, completed=sum(done_steps.values()))

                console.log(f"start {run.name} ({'resume' if start_step else 'new'}, {run.run_dir})")
                entry = self._run_one(run, run_fn, on_step, console)
                done_steps[run.name] = self.steps_per_run - start_step
                with self._lock:
                    self._n_done += 1
                prog.update(overall, completed=sum(done_steps.values()),
                            description=f"runs {self._n_done}/{n_total} done (steps to do)")
                prog.remove_task(current)
                console.log(f"end {run.name}: {entry['status']} in {entry['wall_s']:.1f} s")

            def phase(runs: list[PlannedRun]) -> None:
                if self.parallel == 1:
                    for run in runs:
                        one(run)
                    return
                pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="run")
                futures = [pool.submit(one, run) for run in runs]
                try:
                    wait(futures)
                except KeyboardInterrupt:
                    self._stop.set()  # every live run shuts down (services) or gets one SIGINT (inprocess)
                    console.log("interrupted: stopping the runs in flight")
                    wait(futures)
                    raise
                finally:
                    pool.shutdown(wait=True)
                for f in futures:
                    f.result()  # a KeyboardInterrupt recorded in a worker surfaces here

            phase([r for r in todo if r.oracle_source is None])
            later = [r for r in todo if r.oracle_source is not None]
            if later and not self._stop.is_set():
                phase(self._prepare_oracles(later, console))

    def _prepare_oracles(self, runs: list[PlannedRun], console) -> list[PlannedRun]:
        """v_oracle of each needed vanilla seed (its final checkpoint), once; the oracle runs whose file
        exists go on, the others are recorded as failed with the reason."""
        build = self.oracle_fn or _default_oracle_fn
        info = self.record.setdefault("oracle", {"note": "exploratory ceiling, a cheat: projects against v_oracle "
                                                         "from the vanilla run of another seed", "sources": {}})
        vanilla = {r.seed: r for r in self.runs if r.arm == "vanilla"}
        ready = []
        for run in runs:
            src = vanilla[run.oracle_source]
            path = Path(run.cfg.vhack_path)
            key = str(run.oracle_source)
            if not path.exists() and key not in info["sources"]:
                t = time.time()
                entry = {"source_run": str(src.run_dir), "path": str(path)}
                if not (src.run_dir / "DONE").exists():
                    entry["error"] = f"source run {src.name} is not finished"
                else:
                    console.log(f"v_oracle from {src.name} -> {path}")
                    try:
                        build(src.run_dir, path)
                    except Exception as e:  # noqa: BLE001 - recorded on the oracle runs that needed it
                        entry["error"] = f"{type(e).__name__}: {e}"
                entry["seconds"] = round(time.time() - t, 2)
                info["sources"][key] = entry
                self._write_record()
            if path.exists():
                ready.append(run)
                continue
            err = info["sources"].get(key, {}).get("error", f"{path} is missing")
            with self._lock:
                self._entry(run).update(status="failed", error=f"no v_oracle from vanilla/seed{run.oracle_source}: {err}")
                self._write_record()
            console.log(f"[red]{run.name} not run: no v_oracle from vanilla/seed{run.oracle_source}: {err}")
        return ready

    def _run_one(self, run: PlannedRun, run_fn: RunFn, on_step: Callable[[int, str], None], console) -> dict:
        entry = self._entry(run)
        with self._lock:
            entry.update(status="running", started=_now())
            self._write_record()
        if not (run.run_dir / "config.json").exists():
            run.cfg.save()  # the run's identity on disk: what the skip/resume check compares
        watcher = _StepWatcher(run.run_dir, on_step)
        watcher.start()
        t = time.time()
        outcome: dict[str, Any] = {}
        try:
            run_fn(run.cfg)
            outcome["status"] = "finished" if (run.run_dir / "DONE").exists() else "ended_without_DONE"
        except KeyboardInterrupt:
            outcome["status"] = "interrupted"
            raise
        except Exception as e:  # noqa: BLE001 - record, go on with the other runs
            outcome.update(status="interrupted" if self._stop.is_set() else "failed",
                           error=f"{type(e).__name__}: {e}")
            if not self._stop.is_set():
                console.log(f"[red]{run.name} failed: {type(e).__name__}: {e}")
        finally:
            watcher.stop()
            with self._lock:
                entry.update(outcome, wall_s=round(time.time() - t, 3), finished=_now(), timing=_timing(run.run_dir))
                self._write_record()
        on_step(last_logged_step(run.run_dir), "")
        return entry


def default_seeds(preset: str) -> int:
    return DEFAULT_SEEDS.get(preset, 3)


def default_mode(preset: str) -> str:
    return DEFAULT_MODE.get(preset, "services")


def default_parallel(preset: str) -> int:
    return DEFAULT_PARALLEL.get(preset, 1)


def run_experiment(preset: str = "toy", arms: str | Sequence[str] = "vanilla,projected", seeds: str | int | None = None,
                   out: str | Path | None = None, mode: str | None = None, steps: int | None = None,
                   overrides: Sequence[str] = (), run_fn: RunFn | None = None, prepare_fn: PrepareFn | None = None,
                   report: bool = True, progress: bool = True, parallel: int | None = 1,
                   oracle_fn: OracleFn | None = None, backend: str = "local", devices: Sequence[str] | None = None,
                   runs_per_device: int = 1, ray_address: str | None = None, ray_retries: int = 3) -> dict:
    """Run (or finish) an arms × seeds experiment into OUT and write OUT/experiment.json + the report.
    seeds / mode / parallel None: the preset's defaults (toy: 8 seeds, in-process, 2 at a time; with GPUs
    as many runs as fit on the devices; with Ray every run). backend/devices/ray_*: analysis/dispatch.py."""
    exp = Experiment(preset=preset, arms=arms, seeds=default_seeds(preset) if seeds is None else seeds,
                     out=Path(out or f"runs/exp-{preset}"), mode=mode or default_mode(preset), steps=steps,
                     overrides=list(overrides), run_fn=run_fn, prepare_fn=prepare_fn, report=report,
                     progress=progress, parallel=parallel, oracle_fn=oracle_fn, backend=backend, devices=devices,
                     runs_per_device=runs_per_device, ray_address=ray_address, ray_retries=ray_retries)
    return exp.run()

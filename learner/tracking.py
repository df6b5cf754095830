"""Experiment tracking: every metrics/evals row also goes to TensorBoard (default), wandb or trackio.

`open_trackers(cfg.tracking, run_dir)` opens the backends `tracking.report_to` names. Scalars are
grouped the same way in each: `train/*` (reward, pass and hack rates, loss, KL), `projection/*` (cos
with v_hack, share of modules fired, gradient norms, direction refreshes), `timing/*` (t_generate,
t_grade, t_train, t_sync, ...) and `eval/*` (held-out evaluations). metrics.jsonl stays the record;
a tracker is a view. A backend that was asked for and cannot start stops the run with one line (never
a silent no-op); one that fails mid-run says so once, loudly, and the run goes on without it.
"""
from __future__ import annotations

import importlib
import logging
import math
import re
from pathlib import Path
from typing import Protocol

from shared.config import TrackingConfig

log = logging.getLogger("rankguard.tracking")

PROJECTION_KEYS = frozenset({"cos_mean", "cos_std", "frac_fired", "grad_norm", "grad_norm_total"})
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class TrackingError(ValueError):
    """A tracker that was asked for cannot start; the message says how to install it or turn it off."""


def scalar_tags(prefix: str, row: dict) -> dict[str, float]:
    """One row as `{group/key: value}`: numbers only (bools, None, NaN and strings left out)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if prefix == "eval":
            group = "eval"
        elif k.startswith("t_"):
            group = "timing"
        elif k in PROJECTION_KEYS or k.startswith(("refresh_", "directions_", "flagged_")):
            group = "projection"
        else:
            group = prefix
        out[f"{group}/{k}"] = float(v)
    return out


class Backend(Protocol):
    name: str
    where: str

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f"--report-to {name}: cannot import {module!r} ({e}); install it with "
                            f"`pip install {INSTALL[name]}` or drop it (--report-to none turns tracking off)") from None


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.where = str(log_dir)
        self.writer = SummaryWriter(self.where)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict):
        self.wandb = _import("wandb", "wandb")
        self.run = self.wandb.init(project=cfg.project, name=run_name(run_dir), dir=str(run_dir), config=config,
                                   mode="offline" if cfg.offline else "online", resume="allow", id=_run_id(run_dir))
        self.where = (f"{run_dir / 'wandb'} (offline: `wandb sync {run_dir / 'wandb'}/offline-run-*`)"
                      if cfg.offline else f"wandb project {cfg.project}, run {run_name(run_dir)}")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioBackend:
    name = "trackio"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict):
        self.trackio = _import("trackio", "trackio")
        # local database unless TRACKIO_SPACE_ID names a Space (trackio's own rule)
        self.run = self.trackio.init(project=cfg.project, name=run_name(run_dir), config=config, resume="allow")
        self.where = f"trackio project {cfg.project} (`trackio show --project {cfg.project}`)"

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def run_name(run_dir: Path) -> str:
    """The tracker's run name: the folder, with its arm for experiment runs (`projected/seed3`)."""
    return f"{run_dir.parent.name}/{run_dir.name}" if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run appends to the same run."""
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


class Trackers:
    """The open backends; a failing one is reported once and dropped, the others go on."""

    def __init__(self, backends: list[Backend]):
        self.backends = list(backends)

    def log(self, prefix: str, row: dict, step: int) -> None:
        scalars = scalar_tags(prefix, row)
        for b in list(self.backends):
            try:
                b.log(scalars, step)
            except Exception as e:  # a full disk or a dead tracker must not kill a training run
                log.error("TRACKING: %s stopped writing (%s: %s); metrics.jsonl still has every row",
                          b.name, type(e).__name__, e)
                self.backends.remove(b)

    def where(self) -> list[str]:
        return [f"{b.name}: {b.where}" for b in self.backends]

    def close(self) -> None:
        for b in self.backends:
            try:
                b.close()
            except Exception as e:
                log.error("TRACKING: %s did not close cleanly (%s)", b.name, e)
        self.backends = []


def open_trackers(cfg: TrackingConfig, run_dir: str | Path, config: dict | None = None) -> Trackers:
    """The backends `cfg.report_to` names, started; TrackingError when one cannot start."""
    run_dir = Path(run_dir)
    backends: list[Backend] = []
    for name in dict.fromkeys(cfg.report_to):
        try:
            if name == "tensorboard":
                backends.append(TensorBoardBackend(run_dir / "tb"))
            elif name == "wandb":
                backends.append(WandbBackend(cfg, run_dir, config or {}))
            elif name == "trackio":
                backends.append(TrackioBackend(cfg, run_dir, config or {}))
        except TrackingError:
            for b in backends:
                b.close()
            raise
        except Exception as e:
            for b in backends:
                b.close()
            raise TrackingError(f"--report-to {name}: could not start ({type(e).__name__}: {e}); "
                                f"--report-to none turns tracking off") from None
    return Trackers(backends)


def tracking_lines(cfg: TrackingConfig, run_dir: str | Path) -> list[str]:
    """Where to look, for the run card: one line per tracker the run's config names."""
    run_dir = Path(run_dir)
    out = []
    for name in cfg.report_to:
        if name == "tensorboard":
            out.append(f"tensorboard --logdir {run_dir / 'tb'}  (train/, eval/, projection/, timing/)")
        elif name == "wandb":
            out.append(f"wandb {'offline in ' + str(run_dir / 'wandb') + ' (wandb sync to upload)' if cfg.offline else 'project ' + cfg.project}")
        elif name == "trackio":
            out.append(f"trackio show --project {cfg.project}")
    return out


def check_trackers(cfg: TrackingConfig) -> None:
    """Fail before a run starts (not minutes later in the learner) when a named tracker is not installed."""
    for name in cfg.report_to:
        _import(name, name)

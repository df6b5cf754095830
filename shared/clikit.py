"""Small helpers every CLI area shares: one-line errors instead of tracebacks, config from flags."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, TypeVar

import typer

from .config import RunConfig, resolve_config
from .config_file import with_config_file

F = TypeVar("F", bound=Callable)

SET_HELP = "Override any config field, dotted: --set train.lr=3e-3 --set sampling.group_size=4 (repeatable)."
CONFIG_HELP = ("A run file (TOML, the same dotted keys as --set in [sections]; or a run's config.json). Applied "
               "over the preset (its own `preset = ...` picks one when --preset is not given); --set and "
               "explicit flags win. Start from `rankguard config show --preset NAME > run.toml`.")
PRESET_HELP = "Config preset: toy, lite, qwen35-2b, full (default: the --config file's preset, else toy)."
REPORT_TO_HELP = ("Experiment trackers fed every train/eval row: tensorboard (default, RUN_DIR/tb), wandb, trackio "
                  "(optional installs, offline by default), a comma list, or none. Sets tracking.report_to.")


class UserError(ValueError):
    """Bad input from the user; printed as one `error:` line, exit code 2."""


def friendly_errors(fn: F) -> F:
    """Turn ValueError-family errors (ConfigError, ProblemFormatError, AdapterError, ...) into one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def run_settings(preset: str | None, config: str | Path | None, overrides: list[str] | None,
                 report_to: str | None = None) -> tuple[str, list[str]]:
    """(preset, override items) from --preset, --config, --set and --report-to, in that order of
    precedence from weakest to strongest (the file is checked with file:line errors first)."""
    preset, sets = with_config_file(preset, config, overrides)
    if report_to is not None:
        sets.append(f"tracking.report_to={json.dumps(report_to)}")
    return preset, sets


def config_from_flags(preset: str | None, overrides: list[str] | None, config: str | Path | None = None,
                      **top) -> RunConfig:
    """Preset + --config file + --set overrides + explicit flags (non-None ones win), all validated in
    one place, so a bad flag reads like a bad --set: the key, the problem and the value."""
    preset, sets = with_config_file(preset, config, overrides)
    flags = [f"{key}={json.dumps(value)}" for key, value in top.items() if value is not None]
    return resolve_config(preset, [*sets, *flags])


def run_dir_or(cfg: RunConfig, default: str) -> str:
    """The run dir a config file or --set chose, else `default` (presets never set one)."""
    return cfg.run_dir if cfg.run_dir != RunConfig.model_fields["run_dir"].default else default

"""Small helpers every CLI area shares: one-line errors instead of tracebacks, config from flags."""
from __future__ import annotations

import functools
import json
import sys
from typing import Callable, TypeVar

import typer

from .config import RunConfig, resolve_config

F = TypeVar("F", bound=Callable)

SET_HELP = "Override any config field, dotted: --set train.lr=3e-3 --set sampling.group_size=4 (repeatable)."


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


def config_from_flags(preset: str, overrides: list[str] | None, **top) -> RunConfig:
    """Preset + --set overrides + explicit flags (non-None ones win), all validated in one place,
    so a bad flag reads like a bad --set: the key, the problem and the value."""
    flags = [f"{key}={json.dumps(value)}" for key, value in top.items() if value is not None]
    return resolve_config(preset, [*(overrides or []), *flags])

"""`rankguard config ...`: inspect presets and resolved configs."""
from __future__ import annotations

from typing import Optional

import typer

from .clikit import CONFIG_HELP, SET_HELP, config_from_flags, friendly_errors
from .config import PRESETS
from .config_file import documented_toml

config_app = typer.Typer(help="Inspect presets and resolved run configs.", no_args_is_help=True)


@config_app.command("show")
@friendly_errors
def show(
    preset: Optional[str] = typer.Option(None, help=f"One of: {', '.join(PRESETS)} (default: the --config "
                                                    "file's preset, else toy)."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print config.json's form (no help text) instead."),
) -> None:
    """Print the fully resolved config (preset + --config file + --set): every key with its help text,
    as a TOML run file (`rankguard config show --preset full > run.toml`, edit, `rankguard train --config
    run.toml`), or with --json as config.json."""
    cfg = config_from_flags(preset, set_, config=config)
    typer.echo(cfg.model_dump_json(indent=2) if as_json else documented_toml(cfg), nl=as_json)


@config_app.command("presets")
def presets() -> None:
    """List presets and the model each one trains."""
    for name, p in PRESETS.items():
        typer.echo(f"{name:10s} {p.get('model', {}).get('name_or_path', '?')}")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")

"""`rankguard config ...`: inspect presets and resolved configs."""
from __future__ import annotations

from typing import Optional

import typer

from .clikit import SET_HELP, config_from_flags, friendly_errors
from .config import PRESETS

config_app = typer.Typer(help="Inspect presets and resolved run configs.", no_args_is_help=True)


@config_app.command("show")
@friendly_errors
def show(
    preset: str = typer.Option("toy", help=f"One of: {', '.join(PRESETS)}."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Print the fully resolved config (preset + overrides) as JSON."""
    typer.echo(config_from_flags(preset, set_).model_dump_json(indent=2))


@config_app.command("presets")
def presets() -> None:
    """List presets and the model each one trains."""
    for name, p in PRESETS.items():
        typer.echo(f"{name:10s} {p.get('model', {}).get('name_or_path', '?')}")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")

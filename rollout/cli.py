"""CLI sub-commands of this area (see services/cli.py)."""
import typer


def register(app: typer.Typer) -> None:
    pass

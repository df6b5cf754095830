"""`rankguard` command line. Each area registers its own sub-commands (one place per idea)."""
from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    help="rankguard: split rollout/learner GRPO with AntiPaSTO rank-space gradient projection "
    "against reward hacking. Start with `rankguard toy build`, then `rankguard up --preset toy`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """rankguard: GRPO with rank-space gradient projection against reward hacking."""


@app.command()
def version() -> None:
    """Print the rankguard version."""
    from importlib.metadata import version as v

    typer.echo(v("rankguard"))


# module -> must define `register(app: typer.Typer)`
_AREAS = [
    "shared.cli",          # config show
    "services.toy_cli",    # toy build, show
    "shared.adapter_cli",  # adapter report
    "reward_server.cli",   # serve, grade
    "analysis.vhack_cli",  # vhack extract/validate/decompose/pairs
    "services.train_cli",  # train (in-process loop)
    "services.pipeline_cli",  # up, logs, learner/rollout/reward worker entry points
    "rollout.cli",         # engine checks (vLLM / HF)
    "analysis.cli",        # experiment, report
]

for _mod in _AREAS:
    importlib.import_module(_mod).register(app)


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

"""`rankguard train`: bad input is one `error:` line and exit code 2."""
import typer
from typer.testing import CliRunner

from services.train_cli import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    return app


def test_bad_arm_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(_app(), ["train", "--arm", "bogus", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    out = (res.stderr if hasattr(res, "stderr") and res.stderr else res.output).strip()
    assert out.startswith("error:") and "bogus" in out and "vanilla" in out and "\n" not in out
    assert not (tmp_path / "r").exists()


def test_bad_override_names_valid_keys(tmp_path):
    res = CliRunner().invoke(_app(), ["train", "--set", "train.lrr=1", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    out = (res.stderr if hasattr(res, "stderr") and res.stderr else res.output)
    assert "train.lrr" in out and "train.lr" in out


def test_help_explains():
    res = CliRunner().invoke(_app(), ["train", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "--arm" in res.output

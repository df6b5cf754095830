"""`--config run.toml`: a run's settings in a file, with the same dotted keys as `--set`.

    preset = "full"            # optional: the preset the file starts from (a --preset flag wins)
    run_dir = "runs/full-projected"
    [train]
    arm = "projected"
    lr = 3e-5
    [reward.loopholes]
    se = true

Resolution order: preset, then the file, then `--set`, then explicit flags (`--steps`, `--arm`, ...).
Every problem is one line naming the file and line: TOML syntax (tomllib's own position), an unknown
key (with the valid keys of its section), and a bad value (pydantic's message; tomllib keeps no
positions, so the key's line is found by scanning the file's table headers and assignments).
A run's config.json is accepted too (its lines found the same way, by shared.rundir).
`rankguard config show` prints a complete, commented file to start from.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import PRESETS, ConfigError, RunConfig, _deep_merge, _valid_keys, apply_overrides

_KEY = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})\s*=")


def _split_key(text: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(_KEY, text)]


def toml_key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of its assignment (tables: their header line), for a TOML text."""
    lines: dict[str, int] = {}
    table: list[str] = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        m = _HEADER.match(line)
        if m and not line.lstrip().startswith("[["):
            table = _split_key(m.group(1))
            lines.setdefault(".".join(table), no)
            continue
        m = _ASSIGN.match(line)
        if m:
            path = table + _split_key(m.group(1))
            for i in range(1, len(path) + 1):
                lines.setdefault(".".join(path[:i]), no)
    return lines


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted leaves; a section's value that is a table recurses only where the
    config has a section there (so a dict-valued leaf would stay whole)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@dataclass
class ConfigFile:
    path: Path
    data: dict  # nested, as written
    lines: dict[str, int]  # dotted key -> line

    @property
    def preset(self) -> str | None:
        p = self.data.get("preset")
        return str(p) if p is not None else None

    def where(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:i]))
            if line:
                return f"{self.path}:{line}"
        return str(self.path)

    def overrides(self) -> list[str]:
        """The file as `--set` items (dotted key = JSON value), preset left out (it picks the base)."""
        return [f"{k}={json.dumps(v)}" for k, v in _flatten(self.data).items() if k != "preset"]

    def check(self, preset: str) -> RunConfig:
        """The preset plus this file, validated; the first problem as `file:line: key: what is wrong`."""
        valid = set(_valid_keys(RunConfig))
        for dotted in _flatten(self.data):
            if dotted not in valid:
                section = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
                near = sorted(k for k in valid if k.startswith(section) and k.count(".") == dotted.count("."))
                close = difflib.get_close_matches(dotted, near or sorted(valid), n=3)
                hint = (f"did you mean {' or '.join(close)}?" if close else
                        f"valid keys here: {', '.join(near[:16])}{', ...' if len(near) > 16 else ''}")
                raise ConfigError(f"{self.where(dotted)}: unknown config key {dotted!r}; {hint} "
                                  f"(`rankguard config show` lists every key)")
        if preset not in PRESETS:
            raise ConfigError(f"{self.where('preset')}: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        data = apply_overrides(_deep_merge({"preset": preset}, copy.deepcopy(PRESETS[preset])), self.overrides())
        try:
            return RunConfig.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            dotted = ".".join(str(p) for p in err["loc"] if isinstance(p, str))
            more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise ConfigError(f"{self.where(dotted)}: {dotted}: {err['msg']} (got {err.get('input')!r}){more}") from None


def read_config_file(path: str | Path) -> ConfigFile:
    """A .toml run file (or a run's config.json); syntax errors as `file:line:col: ...`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix == ".json":
        from .config import _line_of, read_config_json

        data = read_config_json(path)
        lines = {k: _line_of(text, k.split(".")) for k in _flatten(data)}
        return ConfigFile(path, data, {k: v for k, v in lines.items() if v})
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(f"{where}: not valid TOML: {msg}") from None
    return ConfigFile(path, data, toml_key_lines(text))


def with_config_file(preset: str | None, config: str | Path | None, overrides: list[str] | None) -> tuple[str, list[str]]:
    """(preset, --set items) for a command given --preset, --config and --set: the file's keys are
    checked (file:line errors) and go before --set, so --set and explicit flags win."""
    sets = list(overrides or [])
    if config is None:
        return preset or "toy", sets
    cf = read_config_file(config)
    chosen = preset or cf.preset or "toy"
    cf.check(chosen)
    return chosen, cf.overrides() + sets


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (placement.resources)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width - 2) or [""]


def documented_toml(cfg: RunConfig) -> str:
    """The whole resolved config as a commented TOML file: every key with its help text (unset keys
    are written commented out), so `rankguard config show > run.toml` is a file to edit and pass back."""
    head, sections = [], []

    def emit(model: BaseModel, out: list[str], prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                sub = [f"[{prefix}{name}]"] + [f"# {line}" for line in _wrap(field.description or "")]
                sections.append(sub)  # before its own sub-sections: [reward] then [reward.loopholes]
                emit(value, sub, f"{prefix}{name}.")
                continue
            out += [f"# {line}" for line in _wrap(field.description or "")]
            out.append(f"{name} = {_toml_value(value)}" if value is not None else f"# {name} =   (unset)")

    emit(cfg, head, "")
    return "\n\n".join("\n".join(block) for block in [head, *sections]) + "\n"

"""`rankguard toy pack` end to end: unpack the shipped default world into a tmp folder (a finished build),
pack it into another tmp folder through the CLI, and check the archive and its manifest."""
from __future__ import annotations

import hashlib
import json
import tarfile

from typer.testing import CliRunner

from services.cli import app
from shared.toy import prebuilt
from shared.toy.build import toy_status


def test_pack_writes_archive_and_manifest(tmp_path):
    fp = prebuilt.shipped_fingerprints()[0]
    build = tmp_path / "build"
    assert prebuilt.unpack(fp, build)
    assert toy_status(build)[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "toy-0000000000000000.tar.xz").write_bytes(b"stale")  # one shipped world: replaced
    res = CliRunner().invoke(app, ["toy", "pack", "--dir", str(build), "--out", str(out)])
    assert res.exit_code == 0, res.output
    archive = out / f"toy-{fp}.tar.xz"
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", archive.name]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert list(manifest) == [fp]
    assert manifest[fp]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert manifest[fp]["bytes"] == archive.stat().st_size
    assert manifest[fp]["stats"] == json.loads((build / "build.json").read_text())["stats"]
    files = sorted(str(p.relative_to(build)) for p in build.rglob("*") if p.is_file())
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == files and members[-1].name == "build.json"
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        for m in members:
            assert tar.extractfile(m).read() == (build / m.name).read_bytes(), m.name
    assert archive.name in res.output.replace("\n", "")  # rich may wrap the path


def test_pack_refuses_an_unfinished_build(tmp_path):
    (tmp_path / "half").mkdir()
    res = CliRunner().invoke(app, ["toy", "pack", "--dir", str(tmp_path / "half"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "is not a finished build (no build.json" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()

"""The shipped default toy world: a fresh clone skips the ~4 min supervised warm start.

`build_toy` unpacks `prebuilt/toy-<fingerprint>.tar.xz` when the fingerprint it wants is the shipped
one and nothing usable is on disk yet; any other config, or `rankguard toy build --force`, builds from
source exactly as before. The archive is the unmodified output of a source build (its build.json says
how it was made: threads, timings, stats) and passes the same completeness check as any build, plus a
sha256 of the archive recorded in `prebuilt/MANIFEST.json`, so a damaged file is refused, never used.

Refresh it after a change that alters the fingerprint (BUILD_VERSION, ToyConfig or WarmStartConfig
defaults): `rankguard toy build --force --threads 1 && rankguard toy pack`. One build per world is
shipped (toy.world = v1 | v2); packing a world replaces only that world's archive.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

PREBUILT_DIR = Path(__file__).parent / "prebuilt"
MANIFEST = PREBUILT_DIR / "MANIFEST.json"


def archive_path(fp: str) -> Path:
    return PREBUILT_DIR / f"toy-{fp}.tar.xz"  # the module's PREBUILT_DIR at call time (tests repoint it)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(path: Path | None = None) -> dict:
    try:
        return json.loads((path or MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def shipped_fingerprints() -> list[str]:
    return sorted(_manifest())


def unpack(fp: str, dest: Path) -> bool:
    """Unpack the shipped build for `fp` into the empty folder `dest`; False when none is shipped.

    Raises ValueError when the archive exists but does not match its recorded hash."""
    path, entry = archive_path(fp), _manifest().get(fp)
    if entry is None or not path.exists():
        return False
    if _sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in {MANIFEST} (damaged?); "
                         "run `rankguard toy build --force` to build from source")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "r:xz") as tar:
        tar.extractall(dest, filter="data")  # plain files only, nothing outside dest
    return True


def pack(build_dir: Path, dest: Path | None = None) -> Path:
    """Archive a finished build (every file in it, build.json last) as the shipped one: `dest` gets
    toy-<fingerprint>.tar.xz (replacing the same world's earlier build) and MANIFEST.json with its sha256."""
    meta = json.loads((build_dir / "build.json").read_text())
    dest = PREBUILT_DIR if dest is None else dest  # read at call time: never bound to the shipped folder early
    fp, world = meta["fingerprint"], world_of(meta)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {k: v for k, v in _manifest(dest / MANIFEST.name).items() if world_of(v) != world}  # one build per world
    for old in dest.glob("toy-*.tar.xz"):
        if old.name.removeprefix("toy-").removesuffix(".tar.xz") not in manifest:
            old.unlink()
    out = dest / archive_path(fp).name
    with tarfile.open(out, "w:xz", preset=9) as tar:
        files = sorted(str(p.relative_to(build_dir)) for p in build_dir.rglob("*") if p.is_file())
        for rel in [f for f in files if f != "build.json"] + ["build.json"]:
            info = tar.gettarinfo(str(build_dir / rel), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with (build_dir / rel).open("rb") as f:
                tar.addfile(info, f)
    manifest[fp] = {"world": world, "sha256": _sha256(out), "bytes": out.stat().st_size,
                    "stats": meta.get("stats"), "created": meta.get("created"), "torch_threads": meta.get("torch_threads")}
    (dest / MANIFEST.name).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def world_of(meta: dict) -> str:
    """The toy world a build.json or MANIFEST entry belongs to (builds from before worlds are v1)."""
    return meta.get("world") or (meta.get("toy") or {}).get("world") or "v1"

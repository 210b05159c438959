"""Fetch PEFT's own generic test suite (Apache-2.0) from the PEFT sdist of the installed version.

The three files ``testing_common.py``, ``testing_utils.py`` and ``test_custom_models.py`` are unpacked, with
PEFT's LICENSE, into ``.peft-tests/peft_tests/`` (git-ignored) so that ``test_peft_generic_suite.py`` can
re-parametrize their test classes with GeoLoRA rows. Fetching needs the package registry (pip), nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock


ROOT = Path(__file__).resolve().parents[1] / ".peft-tests"
FILES = ("testing_common.py", "testing_utils.py", "test_custom_models.py")


def ensure_peft_tests() -> Path:
    """Unpack PEFT's test helpers once (under a file lock: pytest-xdist's workers collect at the same time); return
    the folder to put on ``sys.path``."""
    ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ROOT / "fetch.lock")):
        return _unpack()


def _unpack() -> Path:
    package = ROOT / "peft_tests"
    peft_version = version("peft")
    stamp = package / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == peft_version:
        return ROOT
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                f"peft=={peft_version}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--no-build-isolation",
                "-d",
                tmp,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("peft-*.tar.gz"))
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            for name in (*(f"tests/{f}" for f in FILES), "LICENSE"):
                member = tar.extractfile(f"{top}/{name}")
                (package / Path(name).name).write_bytes(member.read())
    (package / "__init__.py").write_text(
        '"""PEFT\'s generic tests, unpacked from the PEFT sdist (Apache-2.0, see LICENSE)."""\n'
    )
    stamp.write_text(peft_version)
    return ROOT

"""The source distribution is complete: it carries what its own test suite and its docs
need (the suite is run from an unpacked sdist by ``nox -s sdist`` and by ``.ci/run``), and
its metadata names the license and the project's addresses."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the suite, the benchmarks and the docs need, beside the package itself
SHIPPED_DIRECTORIES = ("apsched_mongo", "tests", "benchmarks", "docs")
SHIPPED_FILES = ("README.md", "CHANGELOG.md", "LICENSE", "noxfile.py", "pyproject.toml")


def source_files() -> set[str]:
    files = set(SHIPPED_FILES)
    for directory in SHIPPED_DIRECTORIES:
        for path in (ROOT / directory).rglob("*"):
            relative = path.relative_to(ROOT)
            if (path.is_file() and "__pycache__" not in relative.parts
                    and relative.parts[:2] != ("docs", "_build") and path.suffix != ".pyc"):
                files.add(relative.as_posix())
    return files


def test_the_sdist_holds_everything_its_tests_and_docs_need(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c",
         f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )
    [archive] = tmp_path.glob("apsched_mongo-*.tar.gz")
    with tarfile.open(archive) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        shipped = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
        metadata = Parser().parsestr(sdist.extractfile(f"{top}/PKG-INFO").read().decode())
    missing = sorted(source_files() - shipped)
    assert not missing, f"missing from the sdist: {missing}"
    assert {"tests/conftest.py", "tests/helpers.py", "tests/wire.py", "docs/conf.py",
            "benchmarks/run.py", "CHANGELOG.md", "noxfile.py"} <= shipped
    assert not [name for name in shipped if "__pycache__" in name or name.endswith(".pyc")]

    assert metadata["License-Expression"] == "MIT"
    assert not [value for value in metadata.get_all("Classifier") or [] if "License" in value]
    urls = dict(value.split(", ", 1) for value in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Documentation", "Source", "Changelog", "Issues"}

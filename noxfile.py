"""Developer sessions: ``nox -s tests lint typecheck docs sdist``."""

from __future__ import annotations

import tarfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
PYTHONS = ["3.11", "3.12", "3.13", "3.14"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "apsched_mongo", "tests", "benchmarks")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "apsched_mongo")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML documentation; any Sphinx warning fails the build (-W)."""
    session.install("-e", ".[docs]")
    session.run(
        "python", "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session
def sdist(session: nox.Session) -> None:
    """Build the sdist, unpack it, install it and run its own test suite from there."""
    session.install("build")
    work = Path(session.create_tmp())
    session.run("python", "-m", "build", "--sdist", "--outdir", str(work / "dist"))
    [archive] = (work / "dist").glob("apsched_mongo-*.tar.gz")
    with tarfile.open(archive) as sdist:
        sdist.extractall(work / "unpacked", filter="data")
    [unpacked] = (work / "unpacked").iterdir()
    session.install(f"{unpacked}[test]")
    session.chdir(unpacked)
    session.run("pytest", "-q", *session.posargs)

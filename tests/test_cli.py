"""The command line as a new user meets it: the version, its own name in the usage line,
and one line with exit status 2 -- never a traceback -- for every mistake."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from apsched_mongo import __version__
from apsched_mongo.__main__ import main

VENV_BIN = Path(sys.executable).parent
UNREACHABLE = "mongodb://admin:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=200"


def run(*argv: str, block_memory_extra: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m apsched_mongo ARGV`` in a fresh interpreter, optionally as if the
    ``memory`` extra (mongomock-ng) were not installed."""
    prelude = "import sys; sys.modules['mongomock_ng'] = None; " if block_memory_extra else ""
    code = (f"{prelude}from apsched_mongo.__main__ import main; "
            f"sys.exit(main({list(argv)!r}, prog='python -m apsched_mongo'))")
    if not prelude:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "apsched_mongo", "--version"],
    [str(VENV_BIN / "apsched-mongo"), "--version"],
], ids=["python -m", "console script"])
def test_version(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f" {__version__}")
    assert __version__ != "0.0.0"  # read from the installed metadata


def test_the_usage_line_names_the_command_as_it_was_started() -> None:
    script = subprocess.run([str(VENV_BIN / "apsched-mongo"), "demo", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert script.stdout.startswith("usage: apsched-mongo demo ")
    module = subprocess.run([sys.executable, "-m", "apsched_mongo", "doctor", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert module.stdout.startswith("usage: python -m apsched_mongo doctor ")


@pytest.mark.parametrize(("argv", "expected"), [
    (["demo", "--nodes", "0"], "argument --nodes: must be 1 or more, not 0"),
    (["demo", "--nodes", "two"], "argument --nodes: 'two' is not a whole number"),
    (["demo", "--seconds", "-1"], "argument --seconds: must be a positive number"),
    (["demo", "--seconds", "nan"], "argument --seconds: must be a positive number"),
    (["demo", "--database", "a.b"], "invalid MongoDB database name 'a.b'"),
    (["demo", "--uri", "mongodb://u:hunter2@host:99999"], "invalid MongoDB URI"),
    (["demo", "--uri", "http://u:hunter2@host"], "invalid MongoDB URI"),
    (["doctor", "--uri", "mongodb://u:hunter2@"], "invalid MongoDB URI"),
    (["doctor", "--timeout", "0"], "argument --timeout: must be a positive number"),
    (["migrate", "--from-builtin", "--uri", "nope"], "invalid MongoDB URI"),
    (["migrate", "--from-builtin", "--batch-size", "0"], "argument --batch-size"),
    (["migrate", "--from-builtin", "--source-serializer", "yaml"],
     "argument --source-serializer: invalid choice: 'yaml'"),
    (["migrate"], "the following arguments are required: --from-builtin"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_every_mistake_is_one_line_and_exit_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("apsched-mongo")
    assert expected in line
    assert "hunter2" not in line


@pytest.mark.parametrize("argv", [
    ["demo", "--seconds", "1"],
    ["doctor"],
    ["migrate", "--from-builtin"],
])
def test_without_the_memory_extra_only_the_hint_is_printed(argv: list[str]) -> None:
    result = run(*argv, block_memory_extra=True)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"python -m apsched_mongo {argv[0]}: error: ")
    assert "pip install 'apsched-mongo[memory]'" in line


@pytest.mark.parametrize("argv", [
    ["demo", "--seconds", "1", "--uri", UNREACHABLE],
    ["migrate", "--from-builtin", "--uri", UNREACHABLE],
])
def test_an_unreachable_server_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = err.splitlines()
    assert "cannot reach MongoDB at 127.0.0.1:1 within 0.2 s: connection refused" in line
    assert "Topology Description" not in line
    assert "hunter2" not in err

    assert main([*argv, "--verbose"]) == 2
    err = capsys.readouterr().err
    first, *details = err.splitlines()
    assert "connection refused" in first
    assert "Topology Description" in "\n".join(details)  # the driver's account, on request
    assert "hunter2" not in err


def test_the_production_client_layer_does_not_import_the_fake() -> None:
    code = ("import sys, apsched_mongo, apsched_mongo._client, apsched_mongo.__main__; "
            "print('apsched_mongo.memory' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "False"
    tree = ast.parse((Path(__file__).parent.parent / "apsched_mongo" / "_client.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    assert not [name for name in imported if "memory" in name]

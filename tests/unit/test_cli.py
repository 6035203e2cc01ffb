"""The command line: what it prints itself (the commands have their own tests)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rxfilterd.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_version_is_pyprojects(capsys: pytest.CaptureFixture[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"rxfilterd {project['version']}\n"

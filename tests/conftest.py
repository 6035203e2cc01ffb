"""Shared pytest configuration for rxfilterd's tests."""

from __future__ import annotations

import pytest

from tests.support.guest import in_ci


def pytest_report_header(config: pytest.Config) -> str:
    return f"rxfilterd: CI={'true' if in_ci() else 'false'} (missing real stack => fail)"

"""Run the real rxfilterd as a subprocess and read its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.guest import current_libvirt

Record = dict[str, Any]


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A TOML file from plain values (str, bool, numbers, lists of str).

    Its ``[libvirt] uri`` is the libvirt under test unless SECTIONS says otherwise.
    """
    sections = {
        **sections,
        "libvirt": {"uri": current_libvirt().uri, **sections.get("libvirt", {})},
    }

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class RunningDaemon:
    """`python -m rxfilterd --config FILE` with JSON logs captured to a file."""

    def __init__(
        self,
        workdir: Path,
        sync: dict[str, Any] | None = None,
        *extra: str,
        env: dict[str, str] | None = None,
        log_format: str = "json",
        sections: dict[str, dict[str, Any]] | None = None,
        raw: str = "",
        wrap: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.config = write_config(
            workdir / "rxfilterd.toml",
            {
                "log": {"level": "debug", "format": log_format},
                "sync": sync or {},
                # Its own status socket: not /run/rxfilterd's, which a real daemon may hold.
                "status": {"socket": str(workdir / "status.sock")},
                **(sections or {}),
            },
        )
        if raw:  # TOML that write_config cannot express, such as [[policy]] arrays
            self.config.write_text(self.config.read_text() + "\n" + raw)
        self.log_path = workdir / "rxfilterd.log"
        self.extra = extra
        self.env = env or {}
        # A command to run rxfilterd under, e.g. setpriv to drop a capability.
        self.wrap = list(wrap)
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_seconds: float | None = None

    def start(self) -> RunningDaemon:
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [
                *self.wrap,
                sys.executable,
                "-m",
                "rxfilterd",
                "--config",
                str(self.config),
                *self.extra,
            ],
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        if self.log_format_is_json():
            # Connected, or (no host libvirt: pods only) serving its status socket.
            first = ("connected",) if self.serves_host() else ("connected", "status: listening")
            try:
                self.wait_for(lambda r: r.get("event") in first, 30, "connected to libvirt")
            except BaseException:
                self.stop()  # not entered: no __exit__ would stop it
                raise
        return self

    def serves_host(self) -> bool:
        """Whether its config names a host libvirt ([libvirt] uri not empty)."""
        return 'uri = ""' not in self.config.read_text()

    def log_format_is_json(self) -> bool:
        return '\nformat = "json"' in self.config.read_text()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM; returns the exit status. Must exit within 5 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("rxfilterd did not exit within 5 s of SIGTERM") from None
        self.exit_seconds = time.monotonic() - started
        return code

    def records(self) -> list[Record]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def wait_for(
        self, match: Callable[[Record], bool], timeout: float, what: str = "a log line"
    ) -> Record:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.records():
                if match(record):
                    return record
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"rxfilterd exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"no {what} within {timeout} s; log tail:\n{tail}")
            time.sleep(0.05)

    def __enter__(self) -> RunningDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = self.stop()
        if exc_type is None:
            assert code == 0, f"rxfilterd exited with {code}"


def cli_json(config: Path, command: str, timeout: float = 60.0) -> Any:
    """`rxfilterd COMMAND --json` (status, explain) with CONFIG, parsed; raises on failure."""
    out = subprocess.run(
        [sys.executable, "-m", "rxfilterd", command, "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(out.stdout)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll CHECK until true; returns seconds taken, or fails naming WHAT."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def holds_for(check: Callable[[], bool], seconds: float) -> bool:
    """True if CHECK stays true for SECONDS (sampled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check():
            return False
        time.sleep(0.05)
    return True

"""Run the real rxfilterd as a subprocess and read its JSON log lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.guest import current_libvirt

Record = dict[str, Any]
# The checkout: the daemon runs from it, so `python -m bench.counted_daemon` finds bench.
REPO = Path(__file__).resolve().parents[2]


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
    """`python -m MODULE --config FILE` with JSON logs captured to a file.

    The one runner for tests and benchmarks. MODULE is ``rxfilterd`` or a module that runs it
    with a hook (``bench.counted_daemon``). ``notify``: give it a NOTIFY_SOCKET of our own and
    record what it sends (``wait_ready``). ``wrap``: a command to run it under (setpriv, nice,
    py-spy); ``wrap_forks`` when that command runs it as a child instead of exec'ing it, so
    ``pid`` (what signals go to) is the daemon's and not the wrapper's.
    """

    def __init__(
        self,
        workdir: Path,
        sync: dict[str, Any] | None = None,
        *extra: str,
        env: dict[str, str] | None = None,
        log_format: str = "json",
        level: str = "debug",
        sections: dict[str, dict[str, Any]] | None = None,
        raw: str = "",
        wrap: Sequence[str] = (),
        wrap_forks: bool = False,
        module: str = "rxfilterd",
        notify: bool = False,
        wait_connected: bool = True,
        stop_timeout: float = 5.0,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            workdir / "rxfilterd.toml",
            {
                "log": {"level": level, "format": log_format},
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
        self.wrap = list(wrap)
        self.wrap_forks = wrap_forks
        self.module = module
        self.notify = notify
        self.wait_connected = wait_connected
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the daemon's own pid (under a forking wrap, the wrapper's child)
        self.spawned = 0.0  # wall clock just before it was spawned
        self.exit_seconds: float | None = None
        self.notifications: list[tuple[float, str]] = []  # (wall clock, datagram)
        self._notify: socket.socket | None = None
        self._notify_thread: threading.Thread | None = None

    def command(self) -> list[str]:
        return [*self.wrap, sys.executable, "-m", self.module, "--config", str(self.config)]

    def start(self) -> RunningDaemon:
        drop = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        if self.notify:
            env["NOTIFY_SOCKET"] = self._listen_notify()
        env.update(self.env)
        log = self.log_path.open("ab")
        self.spawned = time.time()
        self.proc = subprocess.Popen(
            [*self.command(), *self.extra], stdout=log, stderr=log, env=env, cwd=REPO
        )
        log.close()
        try:
            self.pid = self._child_pid() if self.wrap_forks else self.proc.pid
            if self.wait_connected and self.log_format_is_json():
                # Connected, or (no host libvirt: pods only) serving its status socket.
                first = ("connected",) if self.serves_host() else ("connected", "status: listening")
                self.wait_for(lambda r: r.get("event") in first, 30, "connected to libvirt")
        except BaseException:
            self.stop()  # not entered: no __exit__ would stop it
            raise
        return self

    def _listen_notify(self) -> str:
        path = self.workdir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(str(path))
        self._notify.settimeout(0.5)
        self.notifications = []
        self._notify_thread = threading.Thread(target=self._read_notify, daemon=True)
        self._notify_thread.start()
        return str(path)

    def _read_notify(self) -> None:
        sock = self._notify
        while sock is not None and sock.fileno() >= 0:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.notifications.append((time.time(), data.decode(errors="replace")))

    def _child_pid(self) -> int:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    return int(pid)
            time.sleep(0.005)
        raise AssertionError(f"{self.wrap[0]} did not start {self.module}")

    def wait_ready(self, timeout: float = 60.0) -> float:
        """When it said READY=1 (wall clock): after its first full sync of every NIC."""
        assert self.notify, "wait_ready needs notify=True"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, text in self.notifications:
                if "READY=1" in text.splitlines():
                    return when
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"rxfilterd exited; log tail:\n{self.tail()}")
            time.sleep(0.01)
        raise AssertionError(f"rxfilterd not ready in {timeout} s; log tail:\n{self.tail()}")

    def serves_host(self) -> bool:
        """Whether its config names a host libvirt ([libvirt] uri not empty)."""
        return 'uri = ""' not in self.config.read_text()

    def log_format_is_json(self) -> bool:
        return '\nformat = "json"' in self.config.read_text()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.pid, signum)

    def stop(self) -> int:
        """SIGTERM; returns the exit status. Must exit within stop_timeout seconds."""
        proc, self.proc = self.proc, None
        try:
            if proc is None:
                return 0
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid or proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"{self.module} did not exit within {self.stop_timeout} s of SIGTERM"
                ) from None
            self.exit_seconds = time.monotonic() - started
            return code
        finally:
            self._close_notify()

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_thread is not None:
            self._notify_thread.join(timeout=2)
            self._notify_thread = None

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

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
                raise AssertionError(f"no {what} within {timeout} s; log tail:\n{self.tail()}")
            time.sleep(0.05)

    def wait_quiet(self, seconds: float = 0.5, timeout: float = 10.0) -> None:
        """Until no filter event has reached the daemon for SECONDS: the guest is done."""
        deadline = time.monotonic() + timeout

        def heard() -> int:
            return sum(r.get("event") == "rx-filter event" for r in self.records())

        while time.monotonic() < deadline:
            seen = heard()
            if holds_for(lambda: heard() == seen, seconds):  # noqa: B023 - called at once
                return
        raise AssertionError(f"the guest's filter events did not stop within {timeout} s")

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """wait_until, with this daemon's log tail in the failure (what did it see?)."""
        try:
            return wait_until(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log tail:\n{self.tail()}") from None

    def __enter__(self) -> Self:
        self.start()
        return self

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

"""Process bookkeeping for the lab: free ports, daemons started and recorded by pid, stopped by pid.

The lab records every process it starts in DIR/lab-state.json ("pids": name -> pid), so `autoport lab down`
stops exactly those, even from another process, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STATE_FILE = "lab-state.json"

# Popen objects of the daemons spawn() started, kept until stop_pid(): dropping one while its process runs
# makes Python warn (ResourceWarning "subprocess N is still running"), an error under filterwarnings=error.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


def _forget(pid: int) -> None:
    p = _SPAWNED.pop(pid, None)
    if p is not None and p.poll() is None:  # records the exit status (an already reaped child counts as exited)
        # /proc may show a dying child as a zombie a moment before waitpid() can reap it: wait for that moment
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(2)


class LabError(Exception):
    """Something in the lab failed to start or stop; the message says what and where its log is."""


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now (bound and released), below the ephemeral range.

    Binding port 0 would give an ephemeral port, which the kernel may hand to one of the many outgoing
    connections the tests make before the server that was meant to listen there has bound it ("Address
    already in use"). Ports below the range are never chosen for outgoing connections.
    """
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(100):
            port = random.randrange(10000, low)  # noqa: S311 - a port number, not a secret
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(host: str, n: int) -> list[int]:
    """n distinct free ports on host (free_port alone may hand out the same port twice once it is released)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def wait_port(host: str, port: int, timeout: float = 15.0, *, what: str = "", log: Path | None = None) -> None:
    """Wait until host:port accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    hint = f"; see {log}" if log else ""
    raise LabError(f"{what or 'service'} did not listen on {host}:{port} within {timeout:.0f}s{hint}")


def wait_for(check: Callable[[], bool], timeout: float = 15.0, *, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise LabError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def read_pidfile(path: Path, timeout: float = 15.0) -> int:
    """The pid in a daemon's pid file (Postfix: master.pid, Dovecot: master.pid), waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text().strip())
            if pid_alive(pid):
                return pid
        time.sleep(0.05)
    raise LabError(f"no live pid in {path} after {timeout:.0f}s")


def spawn(argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start a long-running foreground process in its own session, output to log; return its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _SPAWNED[p.pid] = p
    return p.pid


def run(argv: Sequence[str], *, what: str = "", env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a command to completion; LabError with its output on failure."""
    p = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if p.returncode != 0:
        raise LabError(f"{what or argv[0]} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process (and its process group when it leads one), SIGKILL after timeout."""
    if not pid_alive(pid):
        _forget(pid)
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    targets = [pid]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pgid == pid:
            os.killpg(pgid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid == pid:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)
    _forget(pid)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry.name))
    return out


def stop_group(pid: int, timeout: float = 10.0) -> None:
    """Stop a daemon that leads its own process group (Dovecot's and Postfix's masters), and all of the group.

    SIGTERM goes to the master only, so it stops its children in order; stragglers in the group get SIGTERM,
    then SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    stop_pid(pid, timeout=1.0)  # SIGKILL when it did not listen; reaps it when it is our child
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_members(pid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        end = time.monotonic() + 5.0
        while group_members(pid) and time.monotonic() < end:
            time.sleep(0.05)


def start_postfix(config_dir: Path, pidfile: Path, *, output: Path, log: Path) -> int:
    """`postfix -c DIR start` for a lab instance; the master's pid (from its fresh pid file).

    Output goes to a file, not a pipe: daemons forked by `postfix start` may hold a pipe open for seconds.
    """
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()  # a stale one would be read as the new master's
    with open(output, "ab") as out:
        rc = subprocess.run(
            ["postfix", "-c", str(config_dir), "start"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False,
        ).returncode  # fmt: skip
    if rc != 0:
        raise LabError(f"postfix start failed ({rc}); see {log}:\n{log_tail(log)}")
    return read_pidfile(pidfile)


def log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_service(host: str, port: int, pid: int, *, what: str, log: Path, timeout: float = 15) -> None:
    """Wait until a daemon we started listens on host:port; LabError with its log's tail if it died."""

    def up() -> bool:
        if not pid_alive(pid):
            raise LabError(f"{what} exited during start-up; see {log}:\n{log_tail(log)}")
        try:
            wait_port(host, port, 0.2)
        except LabError:
            return False
        return True

    wait_for(up, timeout, what=f"{what} on {host}:{port} (see {log})")


def load_state(lab_dir: Path) -> dict[str, Any]:
    p = lab_dir / STATE_FILE
    if not p.exists():
        return {}
    data: dict[str, Any] = json.loads(p.read_text())
    return data


def save_state(lab_dir: Path, state: dict[str, Any]) -> None:
    """Write DIR/lab-state.json atomically (write, fsync, rename). Mode 0600: it holds lab passwords."""
    p = lab_dir / STATE_FILE
    tmp = p.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def record_pid(lab_dir: Path, name: str, pid: int | None) -> None:
    state = load_state(lab_dir)
    state.setdefault("pids", {})[name] = pid
    save_state(lab_dir, state)

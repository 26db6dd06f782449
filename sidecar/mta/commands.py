"""Every Postfix and Dovecot command the sidecar runs, in one place, with typed errors.

Postfix: postqueue, postsuper, sendmail, postconf, `postfix reload`; Dovecot: doveconf and doveadm (reload,
proxy kick, auth cache flush, index, pw -l). Each takes the instance's config (`-c DIR` / `-c FILE`; none:
the default instance). The doveadm runs the sidecar repeats per account (proxy list/kick, who, auth cache
flush, index) read the running instance's configuration from its config socket instead of the file
(running_config): that skips the doveconf run doveadm makes to parse the file. `postfix check` runs on a
pseudo-terminal (run_tty): Postfix prints its diagnostics only to a terminal.

CommandNotRun: the program could not be started or timed out. CommandFailed: it ran and exited non-zero
(returncode, stdout, stderr kept). Both are CommandError; callers word their own messages from them.
"""

from __future__ import annotations

import dataclasses
import os
import pty
import select
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PathLike = str | Path | None


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.argv = list(argv)


class CommandNotRun(CommandError):
    """The program could not be started (missing, not executable) or did not finish in time."""


class CommandFailed(CommandError):
    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()
        super().__init__(argv, f"{' '.join(argv)}: exit {returncode}: {tail[-1] if tail else ''}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def output(self) -> str:
        """stderr, else stdout, as text (what a message to an operator quotes)."""
        return (self.stderr or self.stdout).decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def run(argv: Sequence[str], *, timeout: float, stdin: bytes = b"", check: bool = True) -> Result:
    """Run argv; CommandNotRun if it cannot, CommandFailed on a non-zero exit when check is set."""
    try:
        p = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise CommandNotRun(argv, f"{argv[0]}: {e}") from None
    if check and p.returncode != 0:
        raise CommandFailed(argv, p.returncode, p.stdout, p.stderr)
    return Result(p.returncode, p.stdout, p.stderr)


# --- Postfix ----------------------------------------------------------------------------------------------------
def run_tty(argv: Sequence[str], *, timeout: float = 60.0) -> tuple[int, str]:
    """Run a command with stdout/stderr on a pseudo-terminal; (exit status, output).

    Postfix commands print their diagnostics only when stderr is a terminal (otherwise to syslog, which a
    lab or a container may not have), so validation needs a terminal to see why `postfix check` failed.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    except OSError as e:
        os.close(master)
        os.close(slave)
        raise CommandNotRun(argv, f"cannot run {argv[0]}: {e.strerror}") from None
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal has closed it
                    data = b""
                if not data:
                    break
                chunks.append(data)
                continue
            # nothing to read: done once the command has exited (daemons it started may keep the terminal)
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise CommandNotRun(argv, f"{argv[0]} did not finish within {timeout:.0f}s")
    finally:
        os.close(master)
    rc = proc.wait()
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return rc, text


def postfix_check(config_dir: PathLike, *, timeout: float = 60.0) -> tuple[int, str]:
    """`postfix -c DIR check` on a terminal: (exit status, what it printed)."""
    return run_tty(postfix_argv(config_dir, "postfix", "check"), timeout=timeout)


def postfix_argv(config_dir: PathLike, tool: str, *args: str) -> list[str]:
    """A Postfix tool with `-c DIR` (sendmail spells it `-C`)."""
    flag = "-C" if tool == "sendmail" else "-c"
    return [tool, *([flag, str(config_dir)] if config_dir else []), *args]


def postqueue(config_dir: PathLike, *args: str, timeout: float = 30.0) -> bytes:
    """postqueue -j (listing), -i QUEUEID (flush one message), -f; its stdout."""
    return run(postfix_argv(config_dir, "postqueue", *args), timeout=timeout).stdout


def postsuper(config_dir: PathLike, *args: str, timeout: float = 30.0) -> bytes:
    return run(postfix_argv(config_dir, "postsuper", *args), timeout=timeout).stdout


def sendmail(config_dir: PathLike, *args: str, message: bytes, timeout: float = 30.0) -> bytes:
    return run(postfix_argv(config_dir, "sendmail", *args), stdin=message, timeout=timeout).stdout


def postconf(config_dir: PathLike, *args: str, timeout: float = 60.0, check: bool = True) -> Result:
    return run(postfix_argv(config_dir, "postconf", *args), timeout=timeout, check=check)


def postmap(config_dir: PathLike, *args: str, timeout: float = 60.0) -> None:
    run(postfix_argv(config_dir, "postmap", *args), timeout=timeout)


def postfix_reload(config_dir: PathLike, *, timeout: float = 120.0) -> None:
    run(postfix_argv(config_dir, "postfix", "reload"), timeout=timeout)


# --- Dovecot ----------------------------------------------------------------------------------------------------
BASE_DIR_RETRY = 60.0  # seconds before asking doveconf again after it could not tell the base_dir
_base_dirs: dict[tuple[str, str], tuple[str | None, float]] = {}  # (doveconf, config) -> (base_dir, ask again at)
_base_dirs_lock = threading.Lock()


def doveconf_beside(doveadm: str) -> str:
    """The doveconf of this doveadm: the one in the same directory when doveadm is named by a path."""
    if os.sep in (doveadm or ""):
        sibling = os.path.join(os.path.dirname(doveadm), "doveconf")
        if os.access(sibling, os.X_OK):
            return sibling
    return "doveconf"


def base_dir(doveadm: str, dovecot_config: PathLike) -> str | None:
    """The instance's base_dir (`doveconf [-c FILE] base_dir`), asked once per process; None when doveconf
    cannot tell (asked again after BASE_DIR_RETRY)."""
    key = (doveconf_beside(doveadm), str(dovecot_config or ""))
    now = time.monotonic()
    with _base_dirs_lock:
        known = _base_dirs.get(key)
        if known is not None and (known[0] is not None or now < known[1]):
            return known[0]
    found: str | None = None
    try:
        r = run([key[0], *(["-c", key[1]] if key[1] else []), "base_dir"], timeout=30.0)
        name, _, value = r.out.strip().partition("=")  # "base_dir = /run/dovecot" (2.3 and 2.4 alike)
        if name.strip() == "base_dir" and value.strip().startswith("/"):
            found = value.strip()
    except CommandError:
        pass
    with _base_dirs_lock:
        _base_dirs[key] = (found, now + BASE_DIR_RETRY)
    return found


def running_config(doveadm: str, dovecot_config: PathLike) -> str | None:
    """What `doveadm -c` should read for commands that need the running Dovecot anyway: its config socket
    (BASE_DIR/config) when it is there, else the configuration file (None: the default instance, where doveadm
    tries the socket itself). Given a file, doveadm runs doveconf to parse it before every command; given the
    socket, it asks the running config process. Measured (bench/results/storm.md): 12 -> 4-5 ms of CPU per
    doveadm run on Dovecot 2.3.19, 29-36 -> 10-15 ms on 2.4.1."""
    if not dovecot_config:
        return None
    found = base_dir(doveadm, dovecot_config)
    if found is not None:
        sock = os.path.join(found, "config")
        try:
            if stat.S_ISSOCK(os.stat(sock).st_mode):
                return sock
        except OSError:
            pass
    return str(dovecot_config)


def doveadm_argv(doveadm: str, dovecot_config: PathLike, *args: str, running: bool = False) -> list[str]:
    """doveadm [-c CONFIG] ARGS; running: CONFIG is the running instance's config socket when there is one."""
    conf = running_config(doveadm, dovecot_config) if running else (str(dovecot_config) if dovecot_config else None)
    return [doveadm or "doveadm", *(["-c", conf] if conf else []), *args]


def doveadm(
    doveadm: str, dovecot_config: PathLike, *args: str, timeout: float = 60.0, running: bool = False
) -> Result:
    return run(doveadm_argv(doveadm, dovecot_config, *args, running=running), timeout=timeout)


def doveadm_reload(doveadm_bin: str, dovecot_config: PathLike, *, timeout: float = 120.0) -> None:
    doveadm(doveadm_bin, dovecot_config, "reload", timeout=timeout)


def proxy_kick(doveadm_bin: str, dovecot_config: PathLike, login: str, *logins: str, timeout: float = 10.0) -> None:
    """Disconnect the proxied sessions of these logins (they reconnect, now to wherever auth sends them); one
    doveadm run for all of them (its KICK takes a list of users)."""
    doveadm(doveadm_bin, dovecot_config, "proxy", "kick", login, *logins, timeout=timeout, running=True)


def auth_cache_flush(doveadm_bin: str, dovecot_config: PathLike, *users: str, timeout: float = 10.0) -> None:
    """Forget cached passdb/userdb answers for these users (all users when none is named)."""
    doveadm(doveadm_bin, dovecot_config, "auth", "cache", "flush", *users, timeout=timeout, running=True)


def index_mailboxes(doveadm_bin: str, dovecot_config: PathLike, user: str, *, timeout: float = 120.0) -> None:
    doveadm(doveadm_bin, dovecot_config, "index", "-u", user, "*", timeout=timeout, running=True)


def password_schemes(doveadm_bin: str, dovecot_config: PathLike, *, timeout: float = 30.0) -> frozenset[str]:
    """`doveadm pw -l`, upper-cased; CommandFailed also when it lists nothing."""
    argv = doveadm_argv(doveadm_bin, dovecot_config, "pw", "-l")
    r = run(argv, timeout=timeout)
    if not r.out.split():
        raise CommandFailed(argv, r.returncode, r.stdout, r.stderr)
    return frozenset(s.upper() for s in r.out.split())


def doveconf(dovecot_config: PathLike, *args: str, timeout: float = 60.0, check: bool = True) -> Result:
    return run(["doveconf", *(["-c", str(dovecot_config)] if dovecot_config else []), *args], timeout=timeout,
               check=check)  # fmt: skip

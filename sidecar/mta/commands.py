"""Every Postfix and Dovecot command the sidecar runs, in one place, with typed errors.

Postfix: postqueue, postsuper, sendmail, postconf, `postfix reload`; Dovecot: doveconf and doveadm (reload,
proxy kick, auth cache flush, index, pw -l). Each takes the instance's config (`-c DIR` / `-c FILE`; none:
the default instance). `postfix check` runs on a pseudo-terminal (run_tty): Postfix prints its diagnostics
only to a terminal.

CommandNotRun: the program could not be started or timed out. CommandFailed: it ran and exited non-zero
(returncode, stdout, stderr kept). Both are CommandError; callers word their own messages from them.
"""

from __future__ import annotations

import dataclasses
import os
import pty
import select
import subprocess
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
def doveadm_argv(doveadm: str, dovecot_config: PathLike, *args: str) -> list[str]:
    return [doveadm or "doveadm", *(["-c", str(dovecot_config)] if dovecot_config else []), *args]


def doveadm(doveadm: str, dovecot_config: PathLike, *args: str, timeout: float = 60.0) -> Result:
    return run(doveadm_argv(doveadm, dovecot_config, *args), timeout=timeout)


def doveadm_reload(doveadm_bin: str, dovecot_config: PathLike, *, timeout: float = 120.0) -> None:
    doveadm(doveadm_bin, dovecot_config, "reload", timeout=timeout)


def proxy_kick(doveadm_bin: str, dovecot_config: PathLike, login: str, *logins: str, timeout: float = 10.0) -> None:
    """Disconnect the proxied sessions of these logins (they reconnect, now to wherever auth sends them); one
    doveadm run for all of them (its KICK takes a list of users)."""
    doveadm(doveadm_bin, dovecot_config, "proxy", "kick", login, *logins, timeout=timeout)


def auth_cache_flush(doveadm_bin: str, dovecot_config: PathLike, *users: str, timeout: float = 10.0) -> None:
    """Forget cached passdb/userdb answers for these users (all users when none is named)."""
    doveadm(doveadm_bin, dovecot_config, "auth", "cache", "flush", *users, timeout=timeout)


def index_mailboxes(doveadm_bin: str, dovecot_config: PathLike, user: str, *, timeout: float = 120.0) -> None:
    doveadm(doveadm_bin, dovecot_config, "index", "-u", user, "*", timeout=timeout)


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

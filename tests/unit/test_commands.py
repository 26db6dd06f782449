"""mta/commands: argv built per tool, typed errors for a program that cannot run or exits non-zero."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sidecar.mta import commands


def test_postfix_tools_take_the_config_directory() -> None:
    assert commands.postfix_argv("/etc/pf", "postqueue", "-j") == ["postqueue", "-c", "/etc/pf", "-j"]
    assert commands.postfix_argv("/etc/pf", "sendmail", "-f", "") == ["sendmail", "-C", "/etc/pf", "-f", ""]
    assert commands.postfix_argv(None, "postsuper", "-d", "ABC") == ["postsuper", "-d", "ABC"]
    assert commands.doveadm_argv("", "/etc/dovecot/dovecot.conf", "reload") == [
        "doveadm", "-c", "/etc/dovecot/dovecot.conf", "reload",
    ]  # fmt: skip
    assert commands.doveadm_argv("/usr/bin/doveadm", "", "pw", "-l") == ["/usr/bin/doveadm", "pw", "-l"]


def test_a_missing_program_is_not_run() -> None:
    with pytest.raises(commands.CommandNotRun) as e:
        commands.run(["/nonexistent/postqueue", "-j"], timeout=5)
    assert e.value.argv == ["/nonexistent/postqueue", "-j"]
    assert str(e.value).startswith("/nonexistent/postqueue: ")


def test_a_timeout_is_not_run() -> None:
    with pytest.raises(commands.CommandNotRun):
        commands.run(["sleep", "5"], timeout=0.2)


def test_a_non_zero_exit_fails_with_its_output() -> None:
    with pytest.raises(commands.CommandFailed) as e:
        commands.run(["sh", "-c", "echo out; echo first >&2; echo last >&2; exit 3"], timeout=5)
    assert e.value.returncode == 3 and e.value.stdout == b"out\n"
    assert str(e.value).endswith(": exit 3: last")
    assert e.value.output == "first\nlast\n"
    assert isinstance(e.value, commands.CommandError)


def test_check_false_returns_the_result() -> None:
    r = commands.run(["sh", "-c", "echo hi; exit 1"], timeout=5, check=False)
    assert (r.returncode, r.out, r.err) == (1, "hi\n", "")


def test_run_tty_gives_the_output_a_terminal_sees() -> None:
    rc, out = commands.run_tty(["sh", "-c", "test -t 2 && echo tty >&2; exit 4"], timeout=5)
    assert (rc, out) == (4, "tty\n")


def test_password_schemes_refuses_an_empty_list() -> None:
    with pytest.raises(commands.CommandFailed):
        commands.password_schemes("true", None)


def _fake_dovecot(tmp: Path, base_dir: str | None) -> tuple[str, Path]:
    """doveadm and doveconf scripts side by side; doveconf prints `base_dir = BASE_DIR` (or fails) and counts its
    runs in a file."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    runs = tmp / "doveconf-runs"
    answer = f'echo "base_dir = {base_dir}"' if base_dir else "echo 'doveconf: Fatal: broken' >&2; exit 89"
    (bin_dir / "doveconf").write_text(f'#!/bin/sh\necho "$*" >> {runs}\n{answer}\n')
    (bin_dir / "doveadm").write_text("#!/bin/sh\nexit 0\n")
    for name in ("doveconf", "doveadm"):
        (bin_dir / name).chmod(0o755)
    return str(bin_dir / "doveadm"), runs


def test_doveadm_reads_the_running_instances_config_socket(tmp_path: Path) -> None:
    base = tmp_path / "run"
    base.mkdir()
    doveadm, runs = _fake_dovecot(tmp_path, str(base))
    conf = str(tmp_path / "dovecot.conf")
    # no socket yet (Dovecot not running): the file, as before
    assert commands.doveadm_argv(doveadm, conf, "proxy", "list", running=True) == [doveadm, "-c", conf, "proxy", "list"]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(base / "config"))
        assert commands.doveadm_argv(doveadm, conf, "who", running=True) == [doveadm, "-c", str(base / "config"), "who"]
        # the commands that do not need the running Dovecot keep the file
        assert commands.doveadm_argv(doveadm, conf, "pw", "-l") == [doveadm, "-c", conf, "pw", "-l"]
    # doveconf (the one beside this doveadm) was asked once, for this file
    assert runs.read_text().splitlines() == [f"-c {conf} base_dir"]
    # a plain file where the socket should be is not a socket
    (base / "config").unlink()
    (base / "config").write_text("")
    assert commands.doveadm_argv(doveadm, conf, "who", running=True)[2] == conf
    # the default instance: no -c at all (doveadm tries its socket itself), and doveconf is not asked
    assert commands.doveadm_argv(doveadm, "", "who", running=True) == [doveadm, "who"]
    assert len(runs.read_text().splitlines()) == 1


def test_a_doveconf_that_cannot_tell_keeps_the_file_and_is_asked_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doveadm, runs = _fake_dovecot(tmp_path, None)
    conf = str(tmp_path / "other.conf")
    assert commands.doveadm_argv(doveadm, conf, "who", running=True) == [doveadm, "-c", conf, "who"]
    assert commands.doveadm_argv(doveadm, conf, "who", running=True) == [doveadm, "-c", conf, "who"]
    assert len(runs.read_text().splitlines()) == 1  # not once per command
    monkeypatch.setattr(commands, "BASE_DIR_RETRY", 0.0)
    commands._base_dirs.clear()
    commands.doveadm_argv(doveadm, conf, "who", running=True)
    commands.doveadm_argv(doveadm, conf, "who", running=True)
    assert len(runs.read_text().splitlines()) == 3  # asked again once the retry time has passed


def test_doveconf_beside_doveadm() -> None:
    assert commands.doveconf_beside("doveadm") == "doveconf"
    assert commands.doveconf_beside("/nonexistent/bin/doveadm") == "doveconf"

"""mta/commands: argv built per tool, typed errors for a program that cannot run or exits non-zero."""

from __future__ import annotations

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

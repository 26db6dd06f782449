"""Every `autoport` command line shown in README.md and docs/ parses as written (tests/harness/doc_commands.py).

The lab runs the runnable ones for real (tests/e2e/test_doc_commands_lab.py); this one catches a documented form the
argument parser rejects (it did: `autoport lab restart --dir DIR NAME` gave "unrecognized arguments").
"""

from __future__ import annotations

import shlex

import pytest
from harness import doc_commands

from sidecar.ops import cli

COMMANDS = doc_commands.extract()


def test_the_docs_show_command_lines() -> None:
    assert len(COMMANDS) > 20
    assert ("README.md", "autoport lab restart --dir DIR NAME") in COMMANDS


@pytest.mark.parametrize(("doc", "cmd"), [c for c in COMMANDS if c[1].startswith("autoport ")])
def test_every_documented_autoport_form_parses(doc: str, cmd: str) -> None:
    if cmd in doc_commands.NEEDS_HOST and "%s" in cmd:
        return
    lines = doc_commands.expand(cmd)
    assert lines, cmd
    parser = cli.build_parser()
    for line in lines:
        argv = shlex.split(line.format(lab="/tmp/lab", address="alice@example.org"))[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{doc}: `{line}` (from `{cmd}`) does not parse") from e


def test_needs_host_lists_only_documented_commands() -> None:
    """A stale entry is a documented command that the lab test runs after all: the docs showed
    `.venv/bin/pytest tests/e2e/test_ansible.py -q` while the entry said tests/test_ansible.py, so the lab test ran
    the whole Ansible module (minutes) a second time."""
    shown = {doc_commands.strip_comment(cmd) for _doc, cmd in COMMANDS} | {cmd for _doc, cmd in COMMANDS}
    stale = [cmd for cmd in doc_commands.NEEDS_HOST if cmd not in shown]
    assert not stale, f"NEEDS_HOST entries no document shows (fix the path or drop them): {stale}"


def test_documented_test_runs_are_not_run_by_the_lab_test() -> None:
    """pytest and `make test` lines in the docs run (parts of) the suite: the lab test must not start them."""
    runs = [cmd for _doc, cmd in COMMANDS if "pytest" in cmd or cmd.startswith("make test")]
    assert runs, "the docs show how to run the tests"
    for cmd in runs:
        assert doc_commands.strip_comment(cmd) in doc_commands.NEEDS_HOST, cmd


def test_lab_restart_takes_its_name_after_the_options() -> None:
    args = cli.build_parser().parse_args(["lab", "restart", "--dir", "/tmp/lab", "sidecar"])
    assert (args.action, args.name, args.dir) == ("restart", "sidecar", "/tmp/lab")
    args = cli.build_parser().parse_args(["alias", "add", "--replace", "a@example.org", "b@example.org"])
    assert (args.alias, args.targets, args.replace) == ("a@example.org", ["b@example.org"], True)

"""A node's kick (sidecar.migration.cutover.kick_sessions) on Dovecot 2.4, where `doveadm proxy kick` ends nothing:
`doveadm -f tab who -1` read (canned output as Dovecot 2.4.1 and 2.3.19 print it), the login processes proxying
only the account ended, one that also serves another user left alone and the kick not confirmed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import config
from sidecar.migration import cutover
from sidecar.migration.cutover import Session, kick_sessions, login_processes, parse_who
from sidecar.store.base import Kick

# `doveadm -f tab who -1` of Dovecot 2.4.1 (Debian 13) with two proxied IMAP sessions and a local one
WHO_24 = (
    "username\tservice\tpid\tip\tdest_ip\n"
    "bob@example.test\timap-login\t16970\t127.0.0.1\t127.0.0.2\n"
    "alice@example.test\timap-login\t16974\t127.0.0.1\t127.0.0.2\n"
    "carol@example.test\timap\t16990\t127.0.0.1\t\n"
)
# the same of Dovecot 2.3.19 (Debian 12): no dest_ip column, proxied sessions cannot be told apart
WHO_23 = "username\tproto\tpid\tip\nbob@example.test\timap\t16989\t127.0.0.1\n"


def test_who_24_tells_proxied_sessions_apart() -> None:
    sessions = parse_who(WHO_24)
    assert sessions == [
        Session("bob@example.test", "imap-login", 16970, "127.0.0.2"),
        Session("alice@example.test", "imap-login", 16974, "127.0.0.2"),
        Session("carol@example.test", "imap", 16990, ""),
    ]
    assert [s.proxied for s in sessions] == [True, True, False]


def test_who_columns_are_found_by_name() -> None:
    text = "pid\tdest_ip\tusername\tservice\n42\t10.0.0.2\tAlice@Example.test\tpop3-login\nx\t\tbad\tpop3-login\n"
    assert parse_who(text) == [Session("Alice@Example.test", "pop3-login", 42, "10.0.0.2")]


@pytest.mark.parametrize("text", [WHO_23, "", "Error: anvil unreachable\n"])
def test_who_without_dest_ip_is_not_read(text: str) -> None:
    assert parse_who(text) is None


def test_a_login_process_serving_only_the_account_may_be_ended() -> None:
    sessions = parse_who(WHO_24) or []
    assert login_processes(sessions, ("ALICE@example.test",)) == ([16974], [])
    # a local session (imap, no dest_ip) is not the kick's business
    assert login_processes(sessions, ("carol@example.test",)) == ([], [])
    assert login_processes(sessions, ("dave@example.test",)) == ([], [])


def test_a_login_process_shared_with_another_user_is_never_ended() -> None:
    # high-performance mode (restart_request_count = unlimited): one imap-login proxies alice and bob
    shared = WHO_24 + "bob@example.test\timap-login\t16974\t127.0.0.1\t127.0.0.2\n"
    sessions = parse_who(shared) or []
    assert login_processes(sessions, ("alice@example.test",)) == ([], [16974])
    # both logins of one account in one process: still only this account
    both = parse_who(WHO_24.replace("bob@example.test", "jsmith")) or []
    assert login_processes(both, ("alice@example.test", "jsmith")) == ([16970, 16974], [])


# --- kick_sessions against a fake doveadm and real processes named like login processes -------------------------

FAKE_DOVEADM = """#!{python}
import os, sys
args = sys.argv[1:]
table = [line.split("\\t") for line in open({table!r}).read().splitlines()]
def running(pid):  # not exited, not a zombie waiting to be reaped
    try:
        return open(f"/proc/{{pid}}/stat").read().split()[2] != "Z"
    except OSError:
        return False
alive = [row for row in table if running(row[2])]
with open({table!r} + ".calls", "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[:2] == ["proxy", "kick"]:
    print("1 connections kicked")  # Dovecot 2.4.1: and nothing ends
elif args == ["proxy", "list"]:
    print("username           # service    (pids)  (ips)")
    for row in alive:
        print(f"{{row[0]}} 1 {{row[1]}} ({{row[2]}}) ({{row[3]}})")
elif args == ["-f", "tab", "who", "-1"]:
    print("username\\tservice\\tpid\\tip\\tdest_ip")
    for row in alive:
        print("\\t".join(row))
else:
    sys.exit(2)
"""


@pytest.fixture
def login_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start processes whose name (/proc/PID/comm) is imap-login, as Dovecot's are."""
    exe = tmp_path / "imap-login"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([str(exe), "60"])
        procs.append(p)
        return p

    yield [start(), start()]
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def node(tmp_path: Path, rows: list[tuple[str, int]]) -> config.Config:
    table = tmp_path / "sessions.tsv"
    table.write_text("".join(f"{user}\timap-login\t{pid}\t127.0.0.1\t127.0.0.2\n" for user, pid in rows))
    doveadm = tmp_path / "doveadm"
    doveadm.write_text(FAKE_DOVEADM.format(python=sys.executable, table=str(table)))
    doveadm.chmod(0o755)
    return config.from_dict({"target": {"mail_root": str(tmp_path / "mail"), "doveadm": str(doveadm)}})


def test_kick_ends_the_accounts_login_process_only(tmp_path: Path, login_process: list[subprocess.Popen[bytes]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    mine, other = login_process
    cfg = node(tmp_path, [("alice@example.test", mine.pid), ("bob@example.test", other.pid)])
    monkeypatch.setattr(cutover, "_gone", lambda pids: [p.wait(5) for p in login_process if p.pid in pids])
    done = kick_sessions(cfg, ("alice@example.test",))
    assert done == f"no proxied session left (1 login process(es) ended: {mine.pid})"
    assert mine.wait(5) == -signal.SIGTERM
    assert other.poll() is None  # bob's session goes on


def test_with_no_proxied_session_open_one_listing_is_all(
    tmp_path: Path, login_process: list[subprocess.Popen[bytes]]
) -> None:
    _mine, other = login_process
    cfg = node(tmp_path, [("bob@example.test", other.pid)])  # someone else's session only
    assert kick_sessions(cfg, ("alice@example.test", "alice")) == "no proxied session open"
    # no `proxy kick` (each doveadm run costs ~10 ms of CPU, twice per node and cutover), no process ended
    assert (tmp_path / "sessions.tsv.calls").read_text().splitlines() == ["proxy list"]
    assert other.poll() is None


def test_an_open_session_is_still_kicked_and_checked(tmp_path: Path, login_process: list[subprocess.Popen[bytes]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    mine, _ = login_process
    cfg = node(tmp_path, [("alice@example.test", mine.pid)])
    monkeypatch.setattr(cutover, "_gone", lambda pids: [p.wait(5) for p in login_process if p.pid in pids])
    kick_sessions(cfg, ("alice@example.test", "EXAMPLE\\alice"))
    calls = (tmp_path / "sessions.tsv.calls").read_text().splitlines()
    # every spelling in one doveadm run
    assert calls[:3] == ["proxy list", "proxy kick alice@example.test EXAMPLE\\alice", "proxy list"], calls
    assert kick_sessions(cfg, ("alice@example.test",)) == "no proxied session open"  # ended: nothing to kick
    assert mine.wait(5) == -signal.SIGTERM


def test_one_listing_serves_every_kick_of_a_tick(tmp_path: Path, login_process: list[subprocess.Popen[bytes]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    mine, _ = login_process
    cfg = node(tmp_path, [("alice@example.test", mine.pid)])
    monkeypatch.setattr(cutover, "clear_route_cache", lambda cfg, addresses: "route cache cleared")
    monkeypatch.setattr(cutover, "_gone", lambda pids: [p.wait(5) for p in login_process if p.pid in pids])
    kicks = [Kick(i, f"{u}@example.test", (f"{u}@example.test",), 0.0) for i, u in enumerate(("bob", "alice", "carol"))]
    done = cutover.carry_out(cfg, kicks)
    assert done == {0: "route cache cleared; no proxied session open",
                    1: f"route cache cleared; no proxied session left (1 login process(es) ended: {mine.pid})",
                    2: "route cache cleared; no proxied session open"}  # fmt: skip
    calls = (tmp_path / "sessions.tsv.calls").read_text().splitlines()
    # one listing for the three requests; alice's session alone is kicked (then checked, as 2.4 needs)
    assert calls[:3] == ["proxy list", "proxy kick alice@example.test", "proxy list"], calls
    assert not [c for c in calls if "bob" in c or "carol" in c], calls


def test_a_failed_listing_confirms_no_kick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.from_dict({"target": {"mail_root": str(tmp_path / "mail"), "doveadm": str(tmp_path / "nothing")}})
    monkeypatch.setattr(cutover, "clear_route_cache", lambda cfg, addresses: "route cache cleared")
    # no doveadm at all: logged, nothing confirmed (the NodeAgent tries again)
    assert cutover.carry_out(cfg, [Kick(1, "a@example.test", ("a@example.test",), 0.0)]) == {}


def test_kick_is_not_confirmed_while_a_shared_process_proxies_the_account(
    tmp_path: Path, login_process: list[subprocess.Popen[bytes]]
) -> None:
    shared, _ = login_process
    cfg = node(tmp_path, [("alice@example.test", shared.pid), ("bob@example.test", shared.pid)])
    with pytest.raises(OSError, match=rf"1 proxied session\(s\) .* still open .*login process\(es\) {shared.pid} "
                                      r"also serve other users"):  # fmt: skip
        kick_sessions(cfg, ("alice@example.test",))
    assert shared.poll() is None  # neither alice's nor bob's session was cut


def test_a_pid_that_is_no_login_process_any_more_is_not_signalled(tmp_path: Path) -> None:
    # the pid doveadm named exited and the number now belongs to something else (here: this test)
    assert cutover.end_login_processes([Session("a", "imap-login", os.getpid(), "10.0.0.2")], ("a",)) == ([], [])


def test_the_systemd_unit_grants_cap_kill() -> None:
    # the sidecar runs as its own user; Dovecot's login processes as dovenull: signalling them needs CAP_KILL
    unit = Path(__file__).parents[2] / "ansible/roles/autoport/templates/autoport.service.j2"
    lines = unit.read_text().splitlines()
    for key in ("AmbientCapabilities=", "CapabilityBoundingSet="):
        assert "CAP_KILL" in next(x for x in lines if x.startswith(key)).split("=", 1)[1].split(), key


def test_without_cap_kill_the_kick_is_not_confirmed(tmp_path: Path, login_process: list[subprocess.Popen[bytes]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    mine, _ = login_process
    cfg = node(tmp_path, [("alice@example.test", mine.pid)])

    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cutover.os, "kill", refused)
    with pytest.raises(OSError, match="Operation not permitted"):  # carry_out leaves the kick unacknowledged
        kick_sessions(cfg, ("alice@example.test",))
    assert mine.poll() is None

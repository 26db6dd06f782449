"""The cap toward the legacy server end to end (issue 17): a lab legacy Dovecot, the real target and sidecar.

Many accounts log in for the first time at once (each login is checked against the legacy server, each queues a
copy) with limits.legacy_connections = 4: the connections the sidecar holds toward the legacy server, counted by
the kernel (`ss`, established TCP connections from the sidecar's process to the legacy host; the proxied
sessions are Dovecot's and not ours), never exceed 4, and every login gets in. The same storm with no cap goes
above 4 (the counter sees what the cap prevents). Then the byte rate: the real copier, throttled, takes at least
the time the rate asks for, and outside limits.throttle_hours it is not throttled.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness.passthrough_helpers import imap_result
from harness.waiting import wait_state

from sidecar import config
from sidecar.lab import launcher
from sidecar.legacy.limit import BURST, LegacyLimiter
from sidecar.migration.copier import SourceParams, copy_account
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

CAP = 4
LAB = {
    "prefix": "ap-lim-",
    "users": 24,
    "settings": {"limits": {"legacy_connections": CAP, "copy_concurrency": 4, "cutover_grace": 0.5}},
}


class LegacyConnections:
    """Samples the established TCP connections from one process to the legacy host (every 20 ms); the peak."""

    def __init__(self, pid: int, host: str) -> None:
        self.pid, self.host = pid, host
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", self.host], capture_output=True,
                             text=True, timeout=10, check=True).stdout  # fmt: skip
        return sum(1 for line in out.splitlines() if f"pid={self.pid}," in line)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.count())
            self.samples += 1

    def __enter__(self) -> LegacyConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def storm(lab: dict[str, Any], store: Store, users: list[dict[str, str]]) -> tuple[int, int, int]:
    """Every user logs in at once (retrying a temporary failure, as mail clients do), and again while the copies
    run; waits until every account migrated. (peak connections of the sidecar to the legacy host, logins that
    got a temporary failure first, samples taken)."""
    host, port = lab["target"]["host"], lab["target"]["imap"]
    retried = [0]

    def login(u: dict[str, str]) -> str:
        for _ in range(5):
            typ, text = imap_result(host, port, u["address"], u["password"])
            if typ == "OK":
                return typ
            assert "UNAVAILABLE" in text or "temporary" in text.lower(), text  # never a wrong password
            retried[0] += 1
            time.sleep(0.5)
        return f"{typ} {text}"

    pid = int(lab["pids"]["sidecar"])
    with LegacyConnections(pid, lab["legacy"]["host"]) as seen, \
            concurrent.futures.ThreadPoolExecutor(len(users)) as pool:  # fmt: skip
        assert list(pool.map(login, users)) == ["OK"] * len(users)
        assert list(pool.map(login, users)) == ["OK"] * len(users)  # while the copies run
        for u in users:
            wait_state(store, u["address"], State.MIGRATED, 180)
    return seen.peak, retried[0], seen.samples


def test_logins_and_copies_together_never_hold_more_than_the_cap(lab: dict[str, Any], store: Store) -> None:
    peak, retried, samples = storm(lab, store, lab["users"][:12])
    print(f"capped at {CAP}: peak {peak} connections to the legacy server, {retried} login(s) retried, "
          f"{samples} samples")  # fmt: skip
    assert samples > 20
    assert 2 <= peak <= CAP


def test_without_the_cap_the_same_storm_goes_above_it(lab: dict[str, Any], store: Store) -> None:
    path = Path(lab["config"])
    cfg = config.load(path)
    cfg.limits.legacy_connections = 0  # no cap on the sidecar's connections
    path.write_text(config.render(cfg, redact=False))
    lab = {**lab, "pids": {**lab["pids"], "sidecar": launcher.lab_restart(Path(lab["dir"]), "sidecar")}}
    peak, _retried, _samples = storm(lab, store, lab["users"][12:24])
    print(f"no cap: peak {peak} connections to the legacy server")
    assert peak > CAP


def copy_once(cfg: config.Config, user: dict[str, str], work: Path, limiter: LegacyLimiter | None) -> tuple[int, float]:
    """The real copier, one account into a fresh Maildir and store: (bytes copied, seconds)."""
    work.mkdir()
    st = open_store(f"sqlite:///{work / 'state.db'}")
    st.init()
    st.transition(user["address"], State.COPYING, reason="test")
    params = SourceParams.from_config(cfg.legacy, user["login"], use_admin=True, limiter=limiter)
    started = time.monotonic()
    try:
        result = copy_account(params, work / "home", st, user["address"], mode="initial")
    finally:
        st.close()
    return result.bytes_copied, time.monotonic() - started


@pytest.mark.parametrize("in_hours", [True, False])
def test_the_byte_rate_slows_the_copier_only_in_throttle_hours(
    lab: dict[str, Any], tmp_path: Path, in_hours: bool
) -> None:
    cfg = config.load(lab["config"])
    user = lab["users"][0]
    size, unthrottled = copy_once(cfg, user, tmp_path / "probe", None)
    assert size > 4 * BURST
    rate = size // 5  # about 5 s for the mailbox
    hour = time.localtime().tm_hour
    hours = "" if in_hours else f"{(hour + 1) % 24:02d}-{(hour + 2) % 24:02d}"  # (empty: always)
    limiter = LegacyLimiter.from_config(
        config.from_dict({"limits": {"legacy_bytes_per_second": rate, "throttle_hours": hours}}).limits
    )
    copied, took = copy_once(cfg, user, tmp_path / "capped", limiter)
    assert copied == size
    expected = (size - BURST) / rate
    print(f"{size} bytes at {rate} B/s, hours {hours or 'always'}: {took:.2f} s (>= {expected:.2f} s when "
          f"throttled; {unthrottled:.2f} s unthrottled)")  # fmt: skip
    if in_hours:
        assert took >= expected * 0.98 and limiter.throttled_seconds > 0
    else:
        assert limiter.throttled_seconds == 0 and took < expected * 0.6  # (a loaded machine copies in 0.5-1.6 s)

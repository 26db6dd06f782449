"""The dashboard of a running lab sidecar, as a person sees it in a browser (headless Chromium, loopback only).

One user logs in through the target's IMAP with the password the legacy server knows; the sidecar migrates
the account; the page then shows that address and its state. Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import imaplib
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from harness.waiting import wait_for

from sidecar import config
from sidecar.lab import launcher
from sidecar.states import State
from sidecar.store import open_store

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (deploy/apt-packages.txt)"),
]


def chromium(tmp: Path, url: str, *, screenshot: Path | None = None) -> str:
    """--dump-dom of `url` (or a screenshot into `screenshot`); the browser can reach the URL's host only."""
    host = urllib.parse.urlsplit(url).hostname or ""
    assert host.startswith("127."), url
    profile = tmp / f"chromium-{time.monotonic_ns()}"
    argv = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        # nothing resolves but the lab's own address: the browser cannot leave loopback
        "--no-proxy-server", f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {host}",
        f"--user-data-dir={profile}", "--window-size=1200,900",
        f"--screenshot={screenshot}" if screenshot else "--dump-dom",
        url,
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def imap_login(host: str, port: int, login: str, password: str) -> None:
    imap = imaplib.IMAP4(host, port, timeout=30)
    try:
        imap.login(login, password)
        imap.select("INBOX", readonly=True)
    except BaseException:
        imap.shutdown()
        raise
    imap.logout()


def wait_for_state(cfg: config.Config, address: str, state: State, timeout: float = 120.0) -> None:
    store = open_store(cfg.store.url)
    try:
        wait_for(lambda: store.state_of(address) is state, timeout,
                 lambda: f"{address} to be {state} (it is {store.state_of(address)})", interval=0.5)  # fmt: skip
    finally:
        store.close()


def test_dashboard_in_a_browser(lab_dir: Path, tmp_path: Path) -> None:
    info: dict[str, Any] = launcher.lab_up(lab_dir, users=2)
    target = info["target"]
    port = target["dashboard"]
    assert isinstance(port, int)
    cfg = config.load(info["config"])
    token = cfg.dashboard.token
    assert len(token) >= 20
    base = f"http://{target['host']}:{port}/"

    # without credentials: the 401 page, nothing of the lab's
    dom = chromium(tmp_path, base)
    assert "401: token required" in dom
    assert "Authorization: Bearer TOKEN" in dom
    u = info["users"][0]
    assert u["address"] not in dom

    # one user logs in with the legacy password; the sidecar migrates the account
    imap_login(target["host"], target["imap"], u.get("login") or u["address"], u["password"])
    wait_for_state(cfg, u["address"], State.MIGRATED)

    authed = f"http://admin:{token}@{target['host']}:{port}/dashboard"  # the page that asks for Basic
    dom = chromium(tmp_path, authed)
    assert "autoport: migration dashboard" in dom
    assert '<div class="tile t-migrated"><span>migrated</span><b>1</b></div>' in dom
    assert "<span>total</span><b>1</b>" in dom
    assert f"<td>{u['address']}</td><td>transition</td>" in dom
    assert "cutover -&gt; migrated" in dom
    assert info["users"][1]["address"] not in dom  # never logged in, never mailed: unknown to the sidecar
    assert u["password"] not in dom and "argon2" not in dom.lower()

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, authed, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty canvas

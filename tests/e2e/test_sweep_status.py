"""The sweep's cheap first look (sidecar.migration.sweep) against the lab's legacy server, both profiles: one
LIST-STATUS round trip gives what LIST and one STATUS per folder give, and a new message is seen."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import imapclient
import pytest
from harness import copier_lab as lab

from sidecar import config
from sidecar.lab import legacy
from sidecar.legacy.imap import LegacySource
from sidecar.migration.copier import SourceParams
from sidecar.migration.sweep import changed, folder_statuses
from sidecar.store.base import FolderMark

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=legacy.PROFILES)
def srv(request: pytest.FixtureRequest) -> Iterator[Any]:
    root = lab.lab_dir()
    try:
        s = legacy.start_legacy(root / "lab", host=lab.private_host(), profile=request.param, users=1,
                                messages_per_user=20)  # fmt: skip
        try:
            yield s
        finally:
            legacy.stop_legacy(root / "lab")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_list_status_equals_list_then_status(srv: Any) -> None:
    cfg = config.from_dict({"legacy": srv.legacy_config()})
    u = srv.users[0]
    params = SourceParams.from_config(cfg.legacy, u.login, u.password)
    with LegacySource(params) as src:
        assert "LIST-STATUS" in src.capabilities
        fast = folder_statuses(src)
        slow = {f.name: src.status(f.name) for f in src.list_folders() if f.selectable}
        assert fast == slow and len(fast) >= 5
        inbox = next(n for n in fast if n.upper().endswith("INBOX"))
        marks = {n: FolderMark(n, s.uidvalidity, max(0, s.uidnext - 1), s.exists) for n, s in fast.items()}
        assert not any(changed(s, marks[n]) for n, s in fast.items())
    with imapclient.IMAPClient(srv.host, port=srv.imap, ssl=False) as c:
        c.login(u.login, u.password)
        c.append(inbox, b"Message-ID: <late@sweep.test>\r\nSubject: late\r\n\r\nlate\r\n")
    with LegacySource(params) as src:
        after = folder_statuses(src)
    assert [n for n, s in after.items() if changed(s, marks[n])] == [inbox]

"""sidecar.lab.debroot without building anything: id alignment between host and root, wrappers, readiness."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from sidecar.lab import debroot


def _fake_root(tmp_path: Path, passwd: list[str], group: list[str]) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("".join(line + "\n" for line in passwd))
    (root / "etc" / "group").write_text("".join(line + "\n" for line in group))
    return root


def test_ids_follow_the_host_and_collisions_move(tmp_path: Path) -> None:
    host_dovecot = pwd.getpwnam("dovecot")
    host_dovecot_gid = grp.getgrnam("dovecot").gr_gid
    # the root numbered dovecot differently, and gave the host's dovecot uid/gid to someone else
    other_uid, other_gid = host_dovecot.pw_uid + 1000, host_dovecot_gid + 1000
    root = _fake_root(
        tmp_path,
        [
            "root:x:0:0:root:/root:/bin/sh",
            f"dovecot:x:{other_uid}:{other_gid}::/usr/lib/dovecot:/usr/sbin/nologin",
            f"squatter:x:{host_dovecot.pw_uid}:{host_dovecot_gid}::/:/usr/sbin/nologin",
        ],
        ["root:x:0:", f"dovecot:x:{other_gid}:", f"squatter:x:{host_dovecot_gid}:"],
    )
    mine = root / "dovecot-file"
    theirs = root / "squatter-file"
    mine.write_text("")
    theirs.write_text("")
    os.chown(mine, other_uid, other_gid)
    os.chown(theirs, host_dovecot.pw_uid, host_dovecot_gid)

    uid_moves, gid_moves = debroot.align_ids(root)

    rows = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    assert int(rows["dovecot"][2]) == host_dovecot.pw_uid and int(rows["dovecot"][3]) == host_dovecot_gid
    squatter_uid = int(rows["squatter"][2])
    assert squatter_uid not in (host_dovecot.pw_uid, other_uid)
    assert uid_moves[other_uid] == host_dovecot.pw_uid and uid_moves[host_dovecot.pw_uid] == squatter_uid
    assert (mine.stat().st_uid, mine.stat().st_gid) == (host_dovecot.pw_uid, host_dovecot_gid)
    assert theirs.stat().st_uid == squatter_uid and theirs.stat().st_gid == gid_moves[host_dovecot_gid]
    # a second run has nothing left to do
    assert debroot.align_ids(root) == ({}, {})


def test_wrappers_run_each_tool_inside_the_root(tmp_path: Path) -> None:
    bin_dir = debroot.write_wrappers(Path("/srv/root"), tmp_path / "bin")
    for tool in debroot.TOOLS:
        text = (bin_dir / tool).read_text()
        assert os.access(bin_dir / tool, os.X_OK)
        # absolute chroot, the root's own PATH: the wrapper directory is visible inside the root too
        assert f'exec chroot /srv/root /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin {tool} "$@"' in text


def test_a_root_is_ready_only_with_the_current_stamp(tmp_path: Path) -> None:
    assert not debroot.ready(tmp_path)
    (tmp_path / debroot.STAMP).write_text("0\n")
    assert not debroot.ready(tmp_path)
    (tmp_path / debroot.STAMP).write_text(debroot.STAMP_VERSION + "\n")
    assert debroot.ready(tmp_path)


def test_not_root_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(debroot.DebrootError, match="needs root"):
        debroot.ensure(tmp_path / "r")

"""Dovecot's auth cache (issue 17): rendered on for the sql passdb steps and never for the sidecar's step, kept by
finalize; flush requests (kicks of kind "flush", schema v6) carried out by every node's agent with `doveadm auth
cache flush` lines short enough for Dovecot; the CLI commands that change passwords or logins flush everywhere.
A fake doveadm records what it was asked; the real one is tests/e2e/test_auth_cache.py's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.backends import Backend
from harness.cli import autoport

from sidecar import config
from sidecar.migration import cutover
from sidecar.migration.cutover import NodeAgent, flush_everywhere, flush_groups
from sidecar.mta import render
from sidecar.states import State
from sidecar.store import open_store, schema
from sidecar.store.base import ImportedUser, Store

A = "alice@example.org"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    s.init()
    yield s
    s.close()


def fake_doveadm(tmp_path: Path) -> tuple[str, Path]:
    """A doveadm that appends its arguments (one line per run) to a log; the log's path."""
    log = tmp_path / "doveadm.log"
    script = tmp_path / "doveadm"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    os.chmod(script, 0o755)
    return str(script), log


def cfg(tmp_path: Path, **target: object) -> config.Config:
    doveadm, _ = fake_doveadm(tmp_path)
    return config.from_dict({"store": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
                             "target": {"mail_root": str(tmp_path / "mail"), "doveadm": doveadm, **target},
                             "limits": {"kick_timeout": 5.0}})  # fmt: skip


def flushed(log: Path) -> list[list[str]]:
    """The names of every `auth cache flush` the fake doveadm ran, one sorted list per run."""
    if not log.exists():
        return []
    runs = [line.split() for line in log.read_text().splitlines()]
    return [sorted(r[3:]) for r in runs if r[:3] == ["auth", "cache", "flush"]]


# --- flush lines -------------------------------------------------------------------------------------------


def test_flush_groups_fit_one_dovecot_line_and_keep_every_name() -> None:
    names = [f"User{i:04d}-with-a-rather-long-login@a-long-domain-name.example.org" for i in range(200)]
    groups = flush_groups([*names, names[0].lower()])  # the same name twice, in two spellings
    assert len(groups) > 1
    for g in groups:
        assert len(("CACHE-FLUSH\t4294967295\t" + "\t".join(g)).encode()) <= cutover.FLUSH_LINE_BYTES
    assert [n for g in groups for n in g] == [n.lower() for n in names]


def test_a_name_longer_than_a_line_is_left_out() -> None:
    assert flush_groups(["x" * 2000 + "@example.org", A]) == [[A]]


# --- the nodes ---------------------------------------------------------------------------------------------


def test_every_node_flushes_and_a_flush_clears_no_route_cache(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_route(*_a: object, **_k: object) -> str:
        raise AssertionError("a flush request must not touch Postfix")

    monkeypatch.setattr(cutover, "clear_route_cache", no_route)
    logs: list[Path] = []
    agents: list[NodeAgent] = []
    for name in ("n1", "n2"):
        d = tmp_path / name
        d.mkdir()
        logs.append(fake_doveadm(d)[1])
        agents.append(NodeAgent(cfg(d), store, node=name, interval=0.05))
    here = tmp_path / "here"
    here.mkdir()
    c = cfg(here)
    for a in agents:
        a.start()
    try:
        local, acks, missing = flush_everywhere(c, store, A, [A, "Alice"], wait=5)
    finally:
        for a in agents:
            a.stop()
    assert missing == [] and set(acks) == {"n1", "n2"}
    assert local == "auth cache flushed for 2 name(s)"
    assert flushed(here / "doveadm.log") == [sorted(["alice", A])]  # at once, here
    for log in logs:
        # each node's agent: the whole cache when it starts (it may have missed requests), then the request
        assert flushed(log) == [[], sorted(["alice", A])]
    (request,) = [k for k in store.pending_kicks("n3", 0)]
    assert request.kind == "flush" and request.logins == ("Alice", A)


def test_the_flush_requests_found_together_are_one_doveadm_run(store: Store, tmp_path: Path) -> None:
    # a bulk migration leaves several flush requests per tick: one doveadm run (about 10 ms of CPU each) for all
    kicks = [store.request_kick(f"u{i}@example.org", [f"u{i}@example.org", f"U{i}"], kind="flush") for i in range(3)]
    done = cutover.carry_out(cfg(tmp_path), kicks)
    assert set(done) == {k.id for k in kicks}
    assert flushed(tmp_path / "doveadm.log") == [sorted([f"u{i}@example.org" for i in range(3)]
                                                        + [f"u{i}" for i in range(3)])]  # fmt: skip


def test_a_failed_flush_confirms_none_of_the_requests(store: Store, tmp_path: Path) -> None:
    kicks = [store.request_kick(f"u{i}@example.org", [f"u{i}@example.org"], kind="flush") for i in range(2)]
    assert cutover.carry_out(cfg(tmp_path, doveadm=str(tmp_path / "no-such-doveadm")), kicks) == {}


def test_a_node_that_does_not_confirm_is_named_not_waited_for_forever(store: Store, tmp_path: Path) -> None:
    store.node_heartbeat("silent")
    _local, acks, missing = flush_everywhere(cfg(tmp_path), store, A, [A], wait=0.2)
    assert (acks, missing) == ({}, ["silent"])
    assert flushed(tmp_path / "doveadm.log") == [[A]]  # this node's flush does not wait for anyone


def test_a_failing_doveadm_is_reported_and_the_request_still_made(store: Store, tmp_path: Path) -> None:
    c = cfg(tmp_path, doveadm=str(tmp_path / "no-such-doveadm"))
    local, _acks, _missing = flush_everywhere(c, store, A, [A])
    assert local.startswith("not flushed here")
    assert [k.kind for k in store.pending_kicks("n1", 0)] == ["flush"]


def test_runner_flushes_after_the_switch_to_migrated(store: Store, tmp_path: Path) -> None:
    from sidecar.migration.jobs import default_hooks

    c = cfg(tmp_path)
    store.record_login(A, "alice", password_hash="{PLAIN}x")
    store.import_users([ImportedUser(login="asmith", address=A, addresses=("a.smith@example.org",))])
    default_hooks(c, store).after_migrated(A, ["alice"])
    assert flushed(tmp_path / "doveadm.log") == [sorted(["a.smith@example.org", A, "alice", "asmith"])]
    # the proxied sessions of every login it was used with: one `doveadm proxy kick` for all of them
    runs = [line.split() for line in (tmp_path / "doveadm.log").read_text().splitlines()]
    assert [r for r in runs if r[:2] == ["proxy", "kick"]] == [["proxy", "kick", "alice", A]]
    (request,) = store.pending_kicks("n1", 0)
    assert request.kind == "flush" and set(request.logins) == {"a.smith@example.org", A, "alice", "asmith"}


# --- the store ---------------------------------------------------------------------------------------------


def test_kick_kind_is_stored_and_checked(backend: Backend) -> None:
    s = backend.open()
    s.init()
    kick = s.request_kick(A, ["alice"])
    flush = s.request_kick(A, ["alice"], kind="flush")
    assert [(k.id, k.kind) for k in s.pending_kicks("n1", 0)] == [(kick.id, "kick"), (flush.id, "flush")]
    assert kick.logins == ("alice", A) and flush.logins == ("alice",)  # a flush names exactly what it flushes
    bulk = s.request_kick("import-hashes (2 account(s))", [A, "bob@example.org"], kind="flush")
    assert bulk.logins == (A, "bob@example.org")
    with pytest.raises(ValueError, match="kind"):
        s.request_kick(A, [], kind="reboot")


def test_v6_upgrade_keeps_the_requests_of_a_v5_store_as_kicks(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = backend.open()
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])
    assert s.init() == 5
    with s._write() as cur:  # what a v5 sidecar wrote
        cur.execute("INSERT INTO kicks (address, logins, requested_at) VALUES (?, ?, ?)", (A, A, 1.0))
    monkeypatch.undo()
    assert s.upgrade() == [6]
    (old,) = s.pending_kicks("n1", 0)
    assert (old.address, old.logins, old.kind) == (A, (A,), "kick")


# --- the commands ------------------------------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    doveadm, _ = fake_doveadm(tmp_path)
    path = tmp_path / "autoport.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "state.db"}"\n[mail]\ndomains = ["example.org"]\n'
                    f'[target]\ndoveadm = "{doveadm}"\n[hash]\nscheme = "SHA512-CRYPT"\n')  # fmt: skip
    return path


def test_passwd_flushes_the_account_everywhere(store: Store, tmp_path: Path) -> None:
    for st in (State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition(A, st)
    store.record_login(A, "alice", password_hash=None, start_copy=False)
    out = autoport(write_config(tmp_path), "passwd", A, "--stdin", stdin="Secret-1\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert flushed(tmp_path / "doveadm.log") == [sorted([A, "alice"])]
    assert "auth cache flushed here and on 0 node(s)" in out.stdout
    assert [k.kind for k in store.pending_kicks("n1", 0)] == ["flush"]


def test_import_users_flushes_old_and_new_names(store: Store, tmp_path: Path) -> None:
    conf = write_config(tmp_path)
    users = tmp_path / "users.csv"
    users.write_text(f"asmith,{A},old@example.org\n")
    assert autoport(conf, "import-users", str(users)).returncode == 0
    users.write_text(f"asmith,{A},new@example.org\n")
    out = autoport(conf, "import-users", str(users))
    assert out.returncode == 0, out.stdout + out.stderr
    # the replaced extra address is flushed too: a cached answer for it must not keep logging in
    assert flushed(tmp_path / "doveadm.log")[-1] == sorted([A, "asmith", "new@example.org", "old@example.org"])


# --- rendering ---------------------------------------------------------------------------------------------


def _vars(work: Path, series: str, **target: object) -> dict[str, str]:
    c = config.from_dict({"mail": {"domains": ["example.test"]}, "store": {"url": "sqlite:////srv/state.db"},
                          "target": {"dovecot_version": series, **target}})  # fmt: skip
    return render.dovecot_vars(c, queue_directory=str(work / "queue")) | {"dovecot_dir": str(work / "dovecot")}


def test_23_cache_on_for_the_sql_steps_only(work: Path) -> None:
    conf = work / "dovecot"
    render.render_dovecot(conf, _vars(work, "2.3"), validate=False)
    auth = (conf / "conf.d" / "10-auth.conf").read_text()
    assert "auth_cache_size = 10M\n" in auth and "auth_cache_ttl = 3600s\n" in auth
    assert "auth_cache_negative_ttl = 300s\n" in auth and "auth_cache_verify_password_with_worker = yes\n" in auth
    assert "driver = checkpassword" in auth  # step 3, which 2.3 never caches (no cache key)


def test_24_lua_step_is_never_cached(work: Path) -> None:
    conf = work / "dovecot"
    render.render_dovecot(conf, _vars(work, "2.4", auth_cache_size="64M"), validate=False)
    auth = (conf / "conf.d" / "10-auth.conf").read_text()
    assert "auth_cache_size = 64M\n" in auth
    lua = auth[auth.index("passdb autoport {") :]
    assert "use_cache = no" in lua[: lua.index("}")]
    body = "\n".join(x for x in auth[: auth.index("passdb autoport {")].splitlines() if not x.startswith("#"))
    assert "use_cache" not in body  # the sql steps are cached


def test_finalize_keeps_the_cache_also_for_a_record_from_before_it(work: Path) -> None:
    from sidecar.ops.finalize import final_dovecot_vars

    c = config.from_dict({"target": {"auth_cache_size": "32M"}})
    recorded = _vars(work, "2.3")
    assert final_dovecot_vars(c, recorded)["auth_cache_size"] == "10M"  # as it was rendered
    before = {k: v for k, v in recorded.items() if not k.startswith("auth_cache")}
    final = final_dovecot_vars(c, before)
    assert final["auth_cache_size"] == "32M"  # from the configuration, not "0" (the templates before the cache)
    conf = work / "dovecot"
    render.render_dovecot(conf, final, validate=False)
    auth = (conf / "conf.d" / "10-auth.conf").read_text()
    assert "auth_cache_size = 32M\n" in auth and "driver = checkpassword" not in auth


@pytest.mark.parametrize("size", ["ten", "10 MB", "-1", ""])
def test_a_bad_cache_size_is_a_config_error_naming_the_key(size: str) -> None:
    with pytest.raises(config.ConfigError, match=r"target\.auth_cache_size"):
        config.from_dict({"target": {"auth_cache_size": size}})

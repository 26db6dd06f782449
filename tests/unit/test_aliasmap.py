"""Postfix's alias map file (sidecar/mta/aliasmap.py), built with the real postmap and read with postmap -q."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sidecar import config as config_mod
from sidecar.mta import aliasmap
from sidecar.ops import cli
from sidecar.store import open_store
from sidecar.store.base import ImportedUser, Store
from sidecar.store.sql import SqlStore

pytestmark = pytest.mark.skipif(not any(Path(d, "postmap").exists() for d in ("/usr/sbin", "/usr/bin")),
                                reason="Postfix's postmap is not installed")  # fmt: skip


def postfix_dir(tmp_path: Path, spec: str) -> Path:
    pf = tmp_path / "postfix"
    pf.mkdir(exist_ok=True)
    (pf / "main.cf").write_text(f"compatibility_level = 3.6\nvirtual_alias_maps = {spec}\n")
    return pf


def query(spec: str, pf: Path, key: str) -> str | None:
    r = subprocess.run(["postmap", "-c", str(pf), "-q", key, spec], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}", dovecot_group="")
    s.init()
    return s


def cfg_for(tmp_path: Path, pf: Path, store_url: str = "") -> config_mod.Config:
    return config_mod.from_dict({
        "mail": {"domains": ["example.org"]},
        "target": {"postfix_config": str(pf)},
        **({"store": {"url": store_url, "dovecot_group": ""}} if store_url else {}),
    })  # fmt: skip


def test_text_has_the_header_and_leaves_out_what_postfix_cannot_read() -> None:
    text, skipped = aliasmap.map_text([("a@example.org", "b@example.org, c@example.org"), ("bad key@x.org", "b@x.org"),
                                       ("n@example.org", "b@example.org\nevil@x.org"), ("", "b@x.org")])  # fmt: skip
    assert text == aliasmap.HEADER + "a@example.org\tb@example.org, c@example.org\n"
    assert skipped == ["bad key@x.org", "n@example.org", ""]


def test_store_entries_aliases_and_imported_extra_addresses(store: Store) -> None:
    store.set_alias("sales@example.org", ["ann@example.org", "bob@example.org"])
    store.set_alias("info@example.org", ["ann@example.org"])
    store.import_users([ImportedUser("js", "john@example.org", ("js@example.org", "info@example.org"))])
    want = [("info@example.org", "ann@example.org"), ("js@example.org", "john@example.org"),
            ("sales@example.org", "ann@example.org, bob@example.org")]  # fmt: skip
    assert store.alias_entries() == want  # an alias wins over an imported extra address of the same spelling
    assert isinstance(store, SqlStore)
    assert Store.alias_entries(store) == want  # the two-query version says what the generic one says


@pytest.mark.parametrize("db_type", ["hash", "texthash"])
def test_written_map_answers_postfix_and_is_replaced_whole(tmp_path: Path, store: Store, db_type: str) -> None:
    spec = f"{db_type}:{tmp_path}/postfix/autoport/aliases"
    pf = postfix_dir(tmp_path, spec)
    amap = aliasmap.AliasMap(spec, str(pf))
    store.set_alias("sales@example.org", ["ann@example.org", "bob@example.org"])
    assert amap.sync(store)
    assert query(spec, pf, "sales@example.org") == "ann@example.org, bob@example.org"
    assert query(spec, pf, "Sales@Example.ORG") == "ann@example.org, bob@example.org"  # Postfix folds case
    assert query(spec, pf, "ann@example.org") is None
    assert not amap.sync(store)  # nothing changed: nothing written
    files = sorted(p.name for p in amap.path.parent.iterdir() if not p.name.startswith("."))
    assert files == (["aliases", "aliases.db"] if db_type == "hash" else ["aliases"])
    index = Path(f"{amap.path}.db" if db_type == "hash" else amap.path)
    with index.open("rb") as old:
        store.remove_alias("sales@example.org")
        store.set_alias("help@example.org", ["bob@example.org"])
        assert amap.sync(store)
        # replaced, not edited: the open file is gone (link count 0), which is how Postfix's daemons notice
        assert os.fstat(old.fileno()).st_nlink == 0
    assert query(spec, pf, "sales@example.org") is None
    assert query(spec, pf, "help@example.org") == "bob@example.org"
    assert oct(index.stat().st_mode & 0o777) == oct(0o644)  # Postfix's daemons read it whatever the umask
    leftovers = [p.name for p in amap.path.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_an_administrators_own_map_is_never_written(tmp_path: Path, store: Store) -> None:
    spec = f"hash:{tmp_path}/postfix/virtual"
    pf = postfix_dir(tmp_path, spec)
    mine = "postmaster@example.org root@example.org\n"
    (pf / "virtual").write_text(mine)
    assert aliasmap.AliasMap.from_postfix(cfg_for(tmp_path, pf)) is None
    assert (pf / "virtual").read_text() == mine
    # ours (missing, or with the header) is found
    spec = f"hash:{tmp_path}/postfix/autoport/aliases"
    pf = postfix_dir(tmp_path, f"{spec}, hash:{pf}/virtual")
    found = aliasmap.AliasMap.from_postfix(cfg_for(tmp_path, pf))
    assert found is not None and found.spec == spec


def test_a_failed_postmap_is_an_error_naming_the_map_and_keeps_the_old_one(tmp_path: Path, store: Store) -> None:
    spec = f"hash:{tmp_path}/postfix/autoport/aliases"
    pf = postfix_dir(tmp_path, spec)
    amap = aliasmap.AliasMap(spec, str(pf))
    store.set_alias("sales@example.org", ["ann@example.org"])
    amap.sync(store)
    broken = aliasmap.AliasMap(spec, str(tmp_path / "no-such-postfix-dir"))  # postmap -c refuses it
    store.set_alias("help@example.org", ["bob@example.org"])
    with pytest.raises(aliasmap.AliasMapError, match="postmap hash:"):
        broken.sync(store)
    assert query(spec, pf, "sales@example.org") == "ann@example.org"
    assert query(spec, pf, "help@example.org") is None


def test_cli_alias_add_is_in_effect_when_it_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    spec = f"hash:{tmp_path}/postfix/autoport/aliases"
    pf = postfix_dir(tmp_path, spec)
    conf = tmp_path / "autoport.toml"
    conf.write_text(f'[mail]\ndomains = ["example.org"]\n[store]\nurl = "{url}"\ndovecot_group = ""\n'
                    f'[target]\npostfix_config = "{pf}"\n')  # fmt: skip
    open_store(url, dovecot_group="").init()
    assert cli.main(["--config", str(conf), "alias", "add", "sales@example.org", "ann@example.org"]) == 0
    assert f"alias map {spec} up to date" in capsys.readouterr().out
    assert query(spec, pf, "sales@example.org") == "ann@example.org"
    assert cli.main(["--config", str(conf), "alias", "remove", "sales@example.org"]) == 0
    assert query(spec, pf, "sales@example.org") is None
    assert cli.main(["--config", str(conf), "alias", "sync"]) == 0
    (pf / "main.cf").write_text("virtual_alias_maps =\n")
    assert cli.main(["--config", str(conf), "alias", "sync"]) == 1
    assert "names no map autoport writes" in capsys.readouterr().err


def test_keeper_follows_the_store_and_reports_trouble_once(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    spec = f"hash:{tmp_path}/postfix/autoport/aliases"
    pf = postfix_dir(tmp_path, spec)
    keeper = aliasmap.Keeper(cfg_for(tmp_path, pf), store, interval=0.05)
    assert keeper.start()
    try:
        store.set_alias("sales@example.org", ["ann@example.org"])
        from harness.waiting import wait_for

        wait_for(lambda: query(spec, pf, "sales@example.org") == "ann@example.org", 10, "the keeper's write")
    finally:
        keeper.stop()
    assert keeper.map is not None
    keeper.map.postfix_config = str(tmp_path / "gone")
    store.set_alias("help@example.org", ["bob@example.org"])
    keeper.tick()
    keeper.tick()
    assert sum("not written" in r.getMessage() for r in caplog.records) == 1


def test_the_map_an_earlier_finalize_wrote_is_ours_to_rewrite(tmp_path: Path, store: Store) -> None:
    """`autoport finalize` again on a host finalized before the alias map file existed: its texthash map is
    rewritten, not refused as the administrator's."""
    old = tmp_path / "autoport-aliases"
    old.write_text("# generated by `autoport finalize` from the state store (`autoport alias`); rerun it after "
                   "changes\nsales@example.org\tann@example.org\n")  # fmt: skip
    amap = aliasmap.AliasMap(f"texthash:{old}")
    assert amap.ours()
    store.set_alias("help@example.org", ["bob@example.org"])
    assert amap.sync(store)
    assert old.read_text() == aliasmap.HEADER + "help@example.org\tbob@example.org\n"

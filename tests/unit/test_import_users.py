"""`autoport import-users`: the login map file, the store, routing of extra addresses, finalize's alias map."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config as config_mod
from sidecar.auth.routing import RoutingPolicy
from sidecar.ops import cli
from sidecar.ops.finalize import alias_map
from sidecar.ops.users import parse_users_file
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import ImportedUser

CFG = config_mod.from_dict({"mail": {"domains": ["example.org", "example.net"]}})


def test_parse_good_and_bad_lines() -> None:
    text = (
        "# login,address,extra...\n"
        "\n"
        "JSmith, John.Smith@example.org, sales@example.org ,js@example.net\n"
        "mary,mary@example.org\n"
        "bad\n"
        "x,y@other.test\n"
        "z\u200b,z@example.org\n"
        "mary2,mary@example.org\n"
        "k*admin,k@example.org\n"
        "q,q@example.org.\n"
    )
    users, errors = parse_users_file(text, CFG)
    assert users == [
        ImportedUser("jsmith", "john.smith@example.org", ("sales@example.org", "js@example.net")),
        ImportedUser("mary", "mary@example.org"),
    ]
    assert [e.split(":")[0] for e in errors] == ["line 5", "line 6", "line 7", "line 8", "line 9", "line 10"]


def test_cli_import_routes_extra_addresses_and_finalize_keeps_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    conf = tmp_path / "autoport.toml"
    conf.write_text(f'[mail]\ndomains = ["example.org"]\n[store]\nurl = "{url}"\ndovecot_group = ""\n')
    store = open_store(url, dovecot_group="")
    store.init()
    users = tmp_path / "users.csv"
    users.write_text("jsmith,john.smith@example.org,sales@example.org\n")
    assert cli.main(["--config", str(conf), "import-users", str(users)]) == 0
    assert "imported 1 user(s) with 1 extra address(es)" in capsys.readouterr().out
    users.write_text("ok,ok@example.org\nbad line\n")
    assert cli.main(["--config", str(conf), "import-users", str(users)]) == 1
    assert "nothing imported" in capsys.readouterr().err
    assert [u.login for u in store.imported_users()] == ["jsmith"]
    # the imported accounts are part of the legacy inventory: finalize waits for john.smith until he migrates
    assert [(e.name, e.source) for e in store.inventory("account")] == [("john.smith@example.org", "import-users")]
    from sidecar.ops import finalize

    verdict = finalize.check(config_mod.load(conf), store)
    assert not verdict.ready and any("john.smith@example.org" in r for r in verdict.reasons)

    cfg = config_mod.load(conf)
    routing = RoutingPolicy(cfg, store)
    assert routing.lookup("virtual", "sales@example.org").wire() == b"OK john.smith@example.org"
    assert routing.lookup("virtual", "john.smith@example.org").wire() == b"NOTFOUND "
    store.transition("john.smith@example.org", State.COPYING)
    assert "sales@example.org\tjohn.smith@example.org\n" in alias_map(store)
    store.close()

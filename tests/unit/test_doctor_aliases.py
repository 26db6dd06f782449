"""autoport doctor's alias map check (ops/doctor.check_alias_map) against what Postfix's virtual_alias_maps says:
postconf is replaced by its answer (the command is the one thing faked); the map files are real."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config
from sidecar.mta import aliasmap
from sidecar.ops import doctor

SM = "unix:/run/autoport/socketmap.sock"


def findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> list[doctor.Finding]:
    asked: list[list[str]] = []

    def postconf(argv: list[str]) -> tuple[int, str]:
        asked.append(argv)
        return 0, value + "\n"

    monkeypatch.setattr(doctor, "_cmd", postconf)
    cfg = config.from_dict({"target": {"mail_root": str(tmp_path / "mail"), "postfix_config": str(tmp_path)}})
    found = list(doctor.check_alias_map(cfg, SM))
    assert len(asked) == 1  # Postfix is asked once
    return found


def test_the_map_autoport_keeps_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aliases").write_text(aliasmap.HEADER)
    (tmp_path / "aliases.db").write_bytes(b"")
    [f] = findings(tmp_path, monkeypatch, f"hash:{tmp_path}/aliases")
    assert f.status == doctor.OK and f"hash:{tmp_path}/aliases" in f.message


@pytest.mark.parametrize(
    ("value", "files", "expected"),
    [
        (f"socketmap:{SM}:virtual", {}, "is the sidecar's socketmap"),
        ("hash:{d}/theirs", {"theirs": "alias@example.org bob@example.org\n"}, "names no map autoport writes"),
        ("", {}, "(empty) names no map autoport writes"),
        ("hash:{d}/aliases", {"aliases": aliasmap.HEADER}, "aliases.db is missing"),
    ],
)
def test_problems_name_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, files: dict[str, str], expected: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    [f] = findings(tmp_path, monkeypatch, value.format(d=tmp_path))
    assert f.status == doctor.PROBLEM and f.check == "aliases" and expected in f.message and f.fix

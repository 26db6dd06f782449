"""Folder names do not change: a Courier/Cyrus-style legacy server ("INBOX." prefix, "." separator) migrated
through the whole lab (legacy Dovecot, target rendered from dovecot/ with [mail] namespace_* = "auto").

After a user's first login has migrated them, the target answers NAMESPACE, LIST (names and special-use
attributes) and LSUB exactly as the legacy server did, POP3 UIDLs are the same, and the Sieve script copied from
the legacy server (`fileinto "INBOX.Junk"`) still files into the folder it names.
"""

from __future__ import annotations

import imaplib
from typing import Any

import imapclient
import pytest
from harness import e2e_mail
from harness.clients import pop3_uidls
from harness.labs import running_lab

from sidecar import config
from sidecar.legacy.folder import SPECIAL_USES
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-ns-", "users": 2, "profile": "courier-style"}



def _client(host: str, port: int, user: dict[str, Any]) -> imapclient.IMAPClient:
    c = imapclient.IMAPClient(host, port=port, ssl=False, timeout=30)
    c.login(user["login"], user["password"])
    return c


def view(host: str, port: int, user: dict[str, Any]) -> dict[str, Any]:
    """NAMESPACE, LIST (name, delimiter, special-use), LSUB as a client sees them."""
    specials = {s.lower() for s in SPECIAL_USES}
    with _client(host, port, user) as c:
        ns = c.namespace()
        folders = {
            (name, delim.decode(), tuple(sorted(f.decode() for f in flags if f.decode().lower() in specials)))
            for flags, delim, name in c.list_folders()
        }
        subscribed = {name for _f, _d, name in c.list_sub_folders()}
    return {"namespace": ns.personal, "list": folders, "lsub": subscribed}


def wait_state(store: Store, address: str, want: State, timeout: float = 90) -> None:
    def reached() -> bool:
        a = store.get(address)
        assert a is None or a.state is not State.FAILED, f"{address} failed"
        return a is not None and a.state is want

    e2e_mail.wait_for(reached, timeout, f"{address} to reach {want.value}")


def test_target_shows_the_legacy_namespace_and_folder_names(lab: dict[str, Any], store: Store) -> None:
    lg, tg = lab["legacy"], lab["target"]
    user = lab["users"][0]  # alice: has Sieve scripts
    before = view(lg["host"], lg["imap"], user)
    assert before["namespace"] == (("INBOX.", "."),)
    assert ("INBOX.Archive.2023", ".", ()) in before["list"]

    with _client(tg["host"], tg["imap"], user):  # first login: proxied, the copy starts
        pass
    wait_state(store, user["address"], State.MIGRATED)
    after = view(tg["host"], tg["imap"], user)
    assert after == before

    # the target's own answer, not the legacy one through a proxy: the account is local now
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
        c.login(user["login"], user["password"])
        typ, _ = c.select('"INBOX.Archive.2023"', readonly=True)
        assert typ == "OK"

    # POP3 UIDLs unchanged too
    lp = pop3_uidls(lg["host"], lg["pop3"], user)
    assert lp and pop3_uidls(tg["host"], tg["pop3"], user) == lp


def test_sieve_fileinto_names_still_valid(lab: dict[str, Any], store: Store) -> None:
    tg = lab["target"]
    user = lab["users"][0]
    wait_state(store, user["address"], State.MIGRATED)
    mid = e2e_mail.message_id()
    replies, data = e2e_mail.send(tg["host"], tg["smtp"], [user["address"]], mid, headers={"X-Spam-Flag": "YES"})
    assert replies[user["address"]][0] == 250 and data is not None and data[0] == 250

    def filed() -> list[int]:
        with _client(tg["host"], tg["imap"], user) as c:
            c.select_folder("INBOX.Junk", readonly=True)
            return list(c.search(["HEADER", "Message-ID", mid]))

    assert len(e2e_mail.wait_for(filed, 30, "the spam message in INBOX.Junk")) == 1
    with _client(tg["host"], tg["imap"], user) as c:
        c.select_folder("INBOX", readonly=True)
        assert c.search(["HEADER", "Message-ID", mid]) == []


def test_doctor_checks_the_namespace(lab: dict[str, Any], store: Store) -> None:
    import dataclasses

    from sidecar.ops import doctor

    wait_state(store, lab["users"][0]["address"], State.MIGRATED)  # an account to ask NAMESPACE for
    cfg = config.load(lab["config"])
    found = [f for f in doctor.check_namespace(cfg, [lab["users"][0]["address"]], False)]
    assert [f.status for f in found] == [doctor.OK], found
    assert "'INBOX.'" in found[0].message and "legacy" in found[0].message
    # a configuration that asks for another namespace than the rendered one: a problem, with what to set
    other = dataclasses.replace(cfg, mail=dataclasses.replace(cfg.mail, namespace_prefix="", namespace_separator="/"))
    bad = list(doctor.check_namespace(other, [], False))
    assert [f.status for f in bad] == [doctor.PROBLEM]
    assert 'namespace_prefix = ""' in bad[0].fix and 'namespace_separator = "/"' in bad[0].fix


def test_other_namespace_renames_sieve_folders() -> None:
    """An administrator who wants "" and "/" on the target although the legacy server shows "INBOX." and ".":
    the copied Sieve script files into what the target shows ("Junk", not "INBOX.Junk")."""
    settings = {"mail": {"namespace_prefix": "", "namespace_separator": "/"}}
    with running_lab("ap-ns2-", users=1, profile="courier-style", settings=settings) as info:
        s = open_store(config.load(info["config"]).store.url)
        try:
            tg, user = info["target"], info["users"][0]
            with _client(tg["host"], tg["imap"], user):
                pass
            wait_state(s, user["address"], State.MIGRATED)
            assert view(tg["host"], tg["imap"], user)["namespace"] == (("", "/"),)
            events = [e.detail for e in s.events(user["address"]) if e.kind == "sieve"]
            assert any("INBOX.Junk -> Junk" in d for d in events), events
            mid = e2e_mail.message_id()
            e2e_mail.send(tg["host"], tg["smtp"], [user["address"]], mid, headers={"X-Spam-Flag": "YES"})

            def filed() -> list[int]:
                with _client(tg["host"], tg["imap"], user) as c:
                    c.select_folder("Junk", readonly=True)
                    return list(c.search(["HEADER", "Message-ID", mid]))

            assert len(e2e_mail.wait_for(filed, 30, "the spam message in Junk")) == 1
        finally:
            s.close()

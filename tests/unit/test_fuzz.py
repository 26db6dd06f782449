"""Short hypothesis runs of every codec's fuzz target (fuzz/targets.py) plus structured round trips.

The long runs (100,000 inputs per target) are on demand: `python -m fuzz.run all` (docs/security.md has the
timings). Here each property runs a fixed, small number of examples with a deadline, so a hang or a
quadratic blow-up fails `make test` too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz import targets
from fuzz.seeds import SEEDS
from sidecar import config
from sidecar.migration.copier import target_home
from sidecar.wire import authproto, fetchparse
from sidecar.wire.authproto import Reply, Request

FAST = settings(max_examples=300, deadline=dt.timedelta(milliseconds=500), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SLOW = settings(max_examples=100, deadline=dt.timedelta(seconds=2), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def seeded(name: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, seeds, and seeds with bytes spliced in: most inputs get past the first check."""
    seeds = st.sampled_from(SEEDS[name])
    spliced = st.tuples(seeds, st.integers(0, 4000), st.binary(max_size=16)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    )
    return st.one_of(st.binary(max_size=512), seeds, spliced)


# --- the fuzz targets under hypothesis ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["authproto_request", "authproto_reply", "netstring", "socketmap_request",
                                  "fetchparse", "checkpassword_fd3"])  # fmt: skip
def test_target(name: str) -> None:
    target = targets.TARGETS[name]

    @FAST
    @given(seeded(name))
    def run(data: bytes) -> None:
        target(data)

    run()


def test_target_config() -> None:
    @SLOW
    @given(seeded("config"))
    def run(data: bytes) -> None:
        targets.config_loader(data)

    run()


# --- structured round trips --------------------------------------------------------------------------------
# text as the shim decodes it: UTF-8 with surrogateescape (any byte survives)
def _text(limit: int, drop: bytes) -> st.SearchStrategy[str]:
    """Bytes (at most limit, without the bytes in drop) as the shim decodes them: UTF-8, surrogateescape."""
    table = bytes.maketrans(drop, b"x" * len(drop))
    return st.binary(max_size=limit).map(lambda b: b.translate(table).decode("utf-8", "surrogateescape"))


raw_text = _text(64, b"")
no_ctl = _text(32, b"\0\r\n")


@FAST
@given(user=no_ctl, password=_text(128, b"\0"), service=no_ctl, remote=no_ctl, local=no_ctl,
       chunk=st.integers(1, 64))  # fmt: skip
def test_request_round_trip_any_chunking(
    user: str, password: str, service: str, remote: str, local: str, chunk: int
) -> None:
    req = Request(user or "u", password, service, remote, local)
    wire = authproto.encode_request(req)
    reader = authproto.NetstringReader(authproto.MAX_REQUEST)
    payload = None
    for i in range(0, len(wire), chunk):
        assert payload is None
        payload = reader.feed(wire[i : i + chunk])
    assert payload is not None and authproto.parse_request(payload) == req


keys = st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True)


@FAST
@given(st.dictionaries(keys, no_ctl, max_size=8), st.sampled_from(["pass", "x"]), raw_text)
def test_reply_round_trip(fields: dict[str, str], extra_key: str, extra: str) -> None:
    if extra_key == "pass":
        fields["pass"] = extra.replace("\0", "")  # the only value allowed to carry CR/LF
    reply = Reply("OK", fields)
    assert authproto.decode_reply(authproto.encode_reply(reply)) == reply


@st.composite
def fetch_stream(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes, tuple[str, ...]]]]:
    msgs = draw(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.binary(max_size=300),
                                   st.lists(st.sampled_from(["\\Seen", "\\Flagged", "$Label1", "Projekt-X"]),
                                            unique=True, max_size=4)), max_size=4))  # fmt: skip
    out = bytearray()
    for n, (uid, body, flags) in enumerate(msgs, 1):
        out += b"* %d FETCH (UID %d FLAGS (%s) BODY[] {%d}\r\n" % (n, uid, " ".join(flags).encode(), len(body))
        out += body + b")\r\n"
    out += b"A1 OK done\r\n"
    return bytes(out), [(uid, body, tuple(flags)) for uid, body, flags in msgs]


@FAST
@given(fetch_stream(), st.integers(1, 97), st.sampled_from([16, 256, 1 << 20]))
def test_fetch_round_trip_any_chunking(
    stream: tuple[bytes, list[tuple[int, bytes, tuple[str, ...]]]], chunk: int, memory_limit: int
) -> None:
    wire, msgs = stream
    spool = targets._SPOOL
    parser = fetchparse.FetchParser(spool_dir=spool, memory_limit=memory_limit)
    events: list[fetchparse.Event] = []
    for i in range(0, len(wire), chunk):
        events += parser.feed(wire[i : i + chunk])
    got = [e for e in events if isinstance(e, fetchparse.FetchResponse)]
    assert parser.done and len(got) == len(msgs)
    for resp, (uid, body, flags) in zip(got, msgs, strict=True):
        assert resp.uid == uid and resp.flags == flags and resp.body is not None
        assert resp.body.data() == body and resp.body.in_memory == (len(body) <= memory_limit)
        resp.body.discard()
    assert list(spool.iterdir()) == []


# --- config: any shape of parsed TOML ----------------------------------------------------------------------
scalars = st.one_of(st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), raw_text,
                    st.lists(st.text(max_size=5), max_size=3), st.just([1, "a"]), st.just({"x": 1}))  # fmt: skip
section_names = st.sampled_from([*config.SECTIONS, "bogus"])


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in draw(st.lists(section_names, max_size=3, unique=True)):
        cls = config.SECTIONS.get(name)
        known = [f.name for f in dataclasses.fields(cls)] if cls else []
        section_keys = st.sampled_from([*known, "nope"]) if known else st.just("nope")
        data[name] = draw(st.dictionaries(section_keys, scalars, max_size=4))
    return data


@SLOW
@given(config_dicts())
@example({"legacy": {"timeout": float("nan")}})
@example({"legacy": {"imap_port": 70000}})
@example({"limits": {"lease_seconds": float("inf")}})
def test_config_from_any_dict_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = config.from_dict(data, "/etc/autoport/x.toml")
    except config.ConfigError as e:
        assert str(e).startswith("/etc/autoport/x.toml: ")
        return
    for section in config.SECTIONS:
        for f in dataclasses.fields(config.SECTIONS[section]):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float):
                assert value == value and value not in (float("inf"), float("-inf"))


# --- paths: no address leaves the mail root ----------------------------------------------------------------
@FAST
@given(st.text(alphabet=st.sampled_from(list("ab./@\\%*' \u00e9")), max_size=24))
@example("../../etc/passwd@example.org")
@example("x@../../etc")
@example("..@example.org")
@example("a@.")
def test_target_home_stays_under_the_mail_root(address: str) -> None:
    root = Path("/var/vmail")
    try:
        home = target_home(root, address)
    except ValueError:
        return
    resolved = Path(*[p for p in home.parts if p != "."])
    assert ".." not in home.parts and resolved.is_relative_to(root) and resolved != root
    assert len(resolved.relative_to(root).parts) == 2

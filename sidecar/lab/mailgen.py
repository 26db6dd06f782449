"""Seeded mailbox generator: the same seed always gives the same folders, messages, flags, dates and UIDs.

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/mailgen.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.utils import format_datetime
from pathlib import Path

from imapclient import imap_utf7

INBOX: tuple[str, ...] = ()

SYSTEM_FLAGS = ("\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen")
_MAILDIR_FLAG = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
CUSTOM_KEYWORDS = ("todo", "Projekt-X")


@dataclass(frozen=True)
class FolderSpec:
    parts: tuple[str, ...]  # () is INBOX; ("Archive", "2023") is a child folder
    subscribed: bool
    special_use: str = ""  # \Sent, \Drafts, \Trash, \Junk, \Archive or ""
    weight: int = 1  # share of the messages (0: the folder stays empty)

    def name(self, sep: str = "/", prefix: str = "") -> str:
        """The folder's IMAP name (Unicode) for a namespace separator and prefix; INBOX is always INBOX."""
        return "INBOX" if not self.parts else prefix + sep.join(self.parts)


DEFAULT_FOLDERS: tuple[FolderSpec, ...] = (
    FolderSpec(INBOX, True, "", 40),
    FolderSpec(("Sent",), True, "\\Sent", 14),
    FolderSpec(("Drafts",), True, "\\Drafts", 4),
    FolderSpec(("Trash",), True, "\\Trash", 6),
    FolderSpec(("Junk",), False, "\\Junk", 6),
    FolderSpec(("Archive",), True, "\\Archive", 10),
    FolderSpec(("Archive", "2023"), False, "", 10),
    FolderSpec(("Entwürfe alt",), True, "", 5),
    FolderSpec(("Templates",), False, "", 0),
)


@dataclass(frozen=True)
class GenMessage:
    folder: tuple[str, ...]
    seq: int  # position in the folder, expunged ones included: the n-th UID handed out (0-based)
    message_id: str  # without angle brackets
    internaldate: datetime  # aware, UTC, whole seconds
    flags: frozenset[str]  # system flags, e.g. {"\\Seen", "\\Answered"}
    keywords: tuple[str, ...]  # sorted
    expunged: bool  # takes a UID, then is expunged (never visible)
    raw: bytes  # the message, CRLF line endings

    @property
    def size(self) -> int:
        """RFC822.SIZE as an IMAP server reports it (CRLF)."""
        return len(self.raw)


@dataclass(frozen=True)
class _Meta:
    folder: tuple[str, ...]
    when: int
    expunged: bool
    big: int  # attachment bytes (0: plain text)


_FIRST = ("Anna", "Ben", "Clara", "David", "Eva", "Felix", "Greta", "Hans", "Ines", "Jonas", "Zoë", "Jürgen")
_LAST = ("Meyer", "Schmidt", "Wagner", "Becker", "Hoffmann", "Schäfer", "Koch", "Richter", "Dubois", "Novak")
_TOPICS = (
    "Quarterly report", "Lunch on Friday?", "Invoice 2231", "Re: project plan", "Übergabe der Schlüssel",
    "Meeting notes", "Your order has shipped", "Fwd: photos", "Budget für 2024", "Reminder: dentist",
    "Café next week", "Server maintenance window", "Newsletter", "Urlaubsvertretung", "Contract draft v3",
)  # fmt: skip
_WORDS = (
    "mail", "migration", "server", "folder", "message", "please", "thanks", "attached", "review",
    "tomorrow", "meeting", "budget", "plan", "Grüße", "schöne", "Woche", "über", "Straße", "naïve",
    "résumé", "the", "a", "of", "to", "and", "in", "for", "on", "with", "as", "we", "you", "it",
)  # fmt: skip
_BIG = 600_000  # the one large attachment of a mailbox (never expunged)
_YEAR_START = int(datetime(2016, 1, 1, tzinfo=UTC).timestamp())
_YEAR_END = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())
_Y2023 = (int(datetime(2023, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()))


@dataclass
class MailboxPlan:
    """Everything about one generated mailbox except the message bytes (made lazily by messages())."""

    address: str
    seed: int
    count: int  # visible messages
    folders: tuple[FolderSpec, ...]
    uidvalidity_base: int  # folder i gets uidvalidity_base + i, as Dovecot hands them out
    _meta: list[_Meta] = field(repr=False)

    @classmethod
    def make(
        cls,
        address: str,
        seed: int = 1,
        messages: int | None = None,
        folders: tuple[FolderSpec, ...] = DEFAULT_FOLDERS,
    ) -> MailboxPlan:
        """Plan a mailbox; messages=None: 30..60 visible messages, chosen by the seed."""
        rng = _rng(seed, address, "plan")
        count = rng.randint(30, 60) if messages is None else messages
        gaps = 0 if count == 0 else max(1, count // 12)
        weighted = [f for f in folders if f.weight > 0]
        total = count + gaps
        # every weighted folder gets something first, the rest by weight
        chosen = [weighted[i % len(weighted)].parts for i in range(min(total, len(weighted)))]
        chosen += rng.choices([f.parts for f in weighted], [f.weight for f in weighted], k=total - len(chosen))
        big_one = rng.randrange(total) if count >= 20 else -1
        raw: list[tuple[tuple[str, ...], int, int]] = []
        for i, parts in enumerate(chosen):
            lo, hi = _Y2023 if parts == ("Archive", "2023") else (_YEAR_START, _YEAR_END)
            big = 0
            if i == big_one:
                big = _BIG
            elif rng.random() < 0.06:
                big = rng.randint(20_000, 200_000)
            raw.append((parts, rng.randrange(lo, hi), big))
        raw.sort(key=lambda r: (_folder_index(folders, r[0]), r[1]))
        # UID gaps: one in the middle of INBOX, one at the end of another folder (UIDNEXT > last UID + 1),
        # the rest anywhere; never the big message
        gap_at: set[int] = set()
        inbox = [k for k, r in enumerate(raw) if r[0] == INBOX]
        middle = [k for k in inbox[1:-1] if raw[k][2] != _BIG]
        if gaps and middle:
            gap_at.add(middle[0])
        others = [k for k, r in enumerate(raw) if r[0] != INBOX]
        last_of = {raw[k][0]: k for k in others}
        ends = [k for k in last_of.values() if raw[k][2] != _BIG]
        if len(gap_at) < gaps and ends:
            gap_at.add(ends[0])
        keep = set(inbox[:1])  # the first INBOX message carries every flag kind (see _make_message)
        free = [k for k, r in enumerate(raw) if k not in gap_at | keep and r[2] != _BIG]
        gap_at.update(rng.sample(free, min(len(free), gaps - len(gap_at))))
        metas = [_Meta(p, w, k in gap_at, b) for k, (p, w, b) in enumerate(raw)]
        uv = 1_500_000_000 + rng.randrange(0, 150_000_000)
        return cls(address, seed, count, tuple(folders), uv, metas)

    def folder(self, parts: tuple[str, ...]) -> FolderSpec:
        return next(f for f in self.folders if f.parts == parts)

    def expected_counts(self) -> dict[tuple[str, ...], int]:
        """Visible messages per folder (every folder listed, empty ones with 0)."""
        out = {f.parts: 0 for f in self.folders}
        for m in self._meta:
            if not m.expunged:
                out[m.folder] += 1
        return out

    def messages(self) -> Iterator[GenMessage]:
        """The messages in folder order, then UID order (expunged ones included, marked)."""
        seq: dict[tuple[str, ...], int] = {}
        for n, meta in enumerate(self._meta):
            s = seq.get(meta.folder, 0)
            seq[meta.folder] = s + 1
            yield _make_message(self, n, s, meta)


def _folder_index(folders: tuple[FolderSpec, ...], parts: tuple[str, ...]) -> int:
    return next(i for i, f in enumerate(folders) if f.parts == parts)


def _rng(seed: int, address: str, what: str) -> random.Random:
    return random.Random(f"{seed}:{address}:{what}")  # noqa: S311 - lab data, reproducible by design


def _person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = f"{first}.{last}".lower().encode("ascii", "ignore").decode()
    return f"{first} {last}", f"{local}@{rng.choice(['example.net', 'example.org', 'mail.example.com'])}"


def _addr_header(display: str, addr: str) -> str:
    if display.isascii():
        return f'"{display}" <{addr}>'
    return f"{Header(display, 'utf-8').encode()} <{addr}>"


def _flags_for(folder: tuple[str, ...], rng: random.Random) -> tuple[set[str], set[str]]:
    flags: set[str] = set()
    kws: set[str] = set()
    top = folder[0] if folder else "INBOX"
    if top == "INBOX":
        if rng.random() < 0.7:
            flags.add("\\Seen")
        if rng.random() < 0.15:
            flags.add("\\Answered")
        if rng.random() < 0.12:
            flags.add("\\Flagged")
        if rng.random() < 0.08:
            kws.add("$Forwarded")
        if rng.random() < 0.06:
            kws.add(rng.choice(CUSTOM_KEYWORDS))
        if rng.random() < 0.04:
            kws.add("$MDNSent")
    elif top == "Sent":
        flags.add("\\Seen")
    elif top in ("Drafts", "Entwürfe alt"):
        flags.add("\\Draft")
        if rng.random() < 0.5:
            flags.add("\\Seen")
    elif top == "Junk":
        kws.add("$Junk")
        if rng.random() < 0.3:
            flags.add("\\Seen")
    elif top == "Trash":
        flags.add("\\Seen")
        if rng.random() < 0.25:
            flags.add("\\Deleted")
    else:  # Archive and below
        flags.add("\\Seen")
        if rng.random() < 0.2:
            flags.add("\\Answered")
        if rng.random() < 0.1:
            kws.add("$NotJunk")
        if rng.random() < 0.08:
            kws.add(rng.choice(CUSTOM_KEYWORDS))
    return flags, kws


def _make_message(plan: MailboxPlan, n: int, seq: int, meta: _Meta) -> GenMessage:
    rng = _rng(plan.seed, plan.address, f"msg{n}")
    flags, kws = _flags_for(meta.folder, rng)
    # the first INBOX message always has the full set, so every mailbox shows every flag kind
    if not meta.folder and seq == 0:
        flags |= {"\\Seen", "\\Answered", "\\Flagged"}
        kws |= {"$Forwarded", "todo"}
    when = datetime.fromtimestamp(meta.when, UTC)
    digest = hashlib.sha256(f"{plan.seed}:{plan.address}:{n}".encode()).hexdigest()[:20]
    mid = f"{digest}.{meta.when}@lab.example.net"
    other_name, other = _person(rng)
    me = plan.address
    top = meta.folder[0] if meta.folder else "INBOX"
    outgoing = top in ("Sent", "Drafts", "Entwürfe alt")
    sender, rcpt = (("", me), (other_name, other)) if outgoing else ((other_name, other), ("", me))
    subject = rng.choice(_TOPICS)
    if top == "Junk":
        subject = "You have won!!! " + subject
    date = when - timedelta(seconds=rng.randint(5, 900))
    words = rng.choices(_WORDS, k=rng.randint(20, 400))
    body = "".join(" ".join(words[i : i + 11]) + "\n" for i in range(0, len(words), 11))
    headers = []
    if not outgoing:
        headers.append(f"Return-Path: <{other}>")
        headers.append(
            f"Received: from mx.example.net (mx.example.net [192.0.2.{rng.randint(1, 254)}])\n"
            f"\tby legacy.lab.test with ESMTPS id {digest[:10].upper()}\n"
            f"\tfor <{me}>; {format_datetime(when)}"
        )
    headers += [
        f"From: {_addr_header(*sender) if sender[0] else '<' + sender[1] + '>'}",
        f"To: {_addr_header(*rcpt) if rcpt[0] else '<' + rcpt[1] + '>'}",
        f"Subject: {Header(subject, 'utf-8').encode() if not subject.isascii() else subject}",
        f"Date: {format_datetime(date)}",
        f"Message-ID: <{mid}>",
        "MIME-Version: 1.0",
    ]
    if top == "Junk":
        headers.append("X-Spam-Flag: YES")
    if meta.big:
        boundary = f"=_lab_{digest}"
        payload = base64.encodebytes(rng.randbytes(meta.big * 3 // 4)).decode("ascii")
        fname = rng.choice(["report.pdf", "photo.jpg", "Übersicht.xlsx", "scan.tiff"])
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        text = (
            "This is a multi-part message in MIME format.\n\n"
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            f"{body}\n--{boundary}\nContent-Type: application/octet-stream\n"
            f"Content-Disposition: attachment; filename*=utf-8''{_pct(fname)}\n"
            f"Content-Transfer-Encoding: base64\n\n{payload}--{boundary}--\n"
        )
    else:
        headers += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
        text = body
    raw = ("\n".join(headers) + "\n\n" + text).replace("\n", "\r\n").encode("utf-8")
    return GenMessage(
        folder=meta.folder,
        seq=seq,
        message_id=mid,
        internaldate=when,
        flags=frozenset(flags),
        keywords=tuple(sorted(kws)),
        expunged=meta.expunged,
        raw=raw,
    )


def _pct(name: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in ".-_") else f"%{b:02X}" for c in name
                   for b in c.encode())  # fmt: skip


# --- Maildir writer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenMessage:
    uid: int
    message_id: str
    flags: tuple[str, ...]  # system flags, sorted
    keywords: tuple[str, ...]
    internaldate: int  # epoch seconds
    size: int  # RFC822.SIZE


@dataclass
class WrittenFolder:
    parts: tuple[str, ...]
    uidvalidity: int
    uidnext: int
    subscribed: bool
    messages: list[WrittenMessage] = field(default_factory=list)


@dataclass
class MaildirResult:
    maildir: Path
    folders: dict[tuple[str, ...], WrittenFolder]


def maildir_folder_dir(maildir: Path, parts: tuple[str, ...]) -> Path:
    """Where a folder lives in Maildir++: the root for INBOX, else `.A.B` with names in modified UTF-7."""
    if not parts:
        return maildir
    for p in parts:
        if "." in p or "/" in p or not p:
            raise ValueError(f"folder name part {p!r} cannot be stored in Maildir++")
    return maildir / ("." + ".".join(imap_utf7.encode(p).decode("ascii") for p in parts))


def _storage_name(parts: tuple[str, ...]) -> str:
    return "INBOX" if not parts else ".".join(imap_utf7.encode(p).decode("ascii") for p in parts)


def write_maildir(
    plan: MailboxPlan,
    maildir: Path,
    *,
    owner: tuple[int, int] | None = None,
    messages: Iterable[GenMessage] | None = None,
    hostname: str = "legacy",
    pop3_order: str = "uid",
) -> MaildirResult:
    """Write the plan's mailbox as a Maildir++ that Dovecot serves as is (see the module docstring).

    pop3_order "uid": POP3 lists INBOX in UID order (Dovecot's way); "own": in an order of the server's own
    (by a hash of the Message-ID, standing in for Courier's), written as dovecot-uidlist `O<n>` fields, which
    Dovecot's POP3 lists by (maildir-uidlist.c MAILDIR_UIDLIST_REC_EXT_POP3_ORDER).

    maildir must not hold a mailbox yet. owner=(uid, gid): chown everything (the mail user). Directories
    are 0700 and files 0600, as Dovecot makes them.
    """
    if (maildir / "dovecot-uidlist").exists():
        raise FileExistsError(f"{maildir} already holds a mailbox")
    msgs = plan.messages() if messages is None else messages
    result = MaildirResult(maildir, {})
    keywords: dict[tuple[str, ...], list[str]] = {}
    uidlists: dict[tuple[str, ...], list[str]] = {}
    inbox_ids: list[tuple[int, str]] = []
    for i, f in enumerate(plan.folders):
        d = maildir_folder_dir(maildir, f.parts)
        for sub in ("cur", "new", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        if f.parts:
            (d / "maildirfolder").touch(mode=0o600)
        result.folders[f.parts] = WrittenFolder(f.parts, plan.uidvalidity_base + i, 1, f.subscribed)
        keywords[f.parts] = []
        uidlists[f.parts] = []
    for m in msgs:
        wf = result.folders[m.folder]
        uid = m.seq + 1
        wf.uidnext = uid + 1
        if m.expunged:
            continue
        kw = keywords[m.folder]
        letters = []
        for k in m.keywords:
            if k not in kw:
                if len(kw) >= 26:
                    raise ValueError("Maildir supports at most 26 keywords per folder")
                kw.append(k)
            letters.append(chr(ord("a") + kw.index(k)))
        lf = m.raw.replace(b"\r\n", b"\n")
        ts = int(m.internaldate.timestamp())
        base = f"{ts}.M{uid:06d}P{plan.seed}Q{m.seq}.{hostname},S={len(lf)},W={len(m.raw)}"
        fl = "".join(sorted(_MAILDIR_FLAG[f] for f in m.flags)) + "".join(sorted(letters))
        path = maildir_folder_dir(maildir, m.folder) / "cur" / f"{base}:2,{fl}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(lf)
        os.utime(path, (ts, ts))
        uidlists[m.folder].append(f"{uid} :{base}\n")
        if not m.folder:
            inbox_ids.append((uid, m.message_id))
        wf.messages.append(WrittenMessage(uid, m.message_id, tuple(sorted(m.flags)), m.keywords, ts, len(m.raw)))
    if pop3_order == "own":
        ranked = sorted(inbox_ids, key=lambda x: hashlib.sha256(x[1].encode()).hexdigest())
        order = {uid: n for n, (uid, _mid) in enumerate(ranked, 1)}
        uidlists[INBOX] = [
            line.replace(" :", f" O{order[int(line.split(' ', 1)[0])]} :", 1) for line in uidlists[INBOX]
        ]
    elif pop3_order != "uid":
        raise ValueError(f"pop3_order must be uid or own, not {pop3_order!r}")
    for parts, wf in result.folders.items():
        d = maildir_folder_dir(maildir, parts)
        guid = hashlib.md5(f"{plan.seed}:{plan.address}:{parts}".encode(), usedforsecurity=False).hexdigest()
        header = f"3 V{wf.uidvalidity} N{wf.uidnext} G{guid}\n"
        (d / "dovecot-uidlist").write_text(header + "".join(uidlists[parts]))
        if keywords[parts]:
            (d / "dovecot-keywords").write_text("".join(f"{i} {k}\n" for i, k in enumerate(keywords[parts])))
    # Dovecot 2.3 subscriptions file: "V\t2\n\n" then one name per line, hierarchy levels separated by TAB
    subs = [f.parts for f in plan.folders if f.subscribed]
    (maildir / "subscriptions").write_text("V\t2\n\n" + "".join("\t".join(p) + "\n" if p else "INBOX\n" for p in subs))
    if owner is not None:
        chown_tree(maildir, owner)
    return result


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    uid, gid = owner
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


# --- Sieve ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SieveSet:
    scripts: dict[str, str]  # name -> script text
    active: str  # the active script's name


def sieve_scripts(plan: MailboxPlan, mailbox_name: Callable[[tuple[str, ...]], str]) -> SieveSet:
    """A user's Sieve scripts: "filters" (active: spam to Junk, a list to Archive) and "vacation" (inactive).

    mailbox_name maps folder parts to the name Sieve's fileinto needs on that server (namespace prefix and
    separator), e.g. ("Archive", "2023") -> "INBOX.Archive.2023" on a Courier-style server.
    """
    rng = _rng(plan.seed, plan.address, "sieve")
    who = _person(rng)[1]
    filters = (
        'require ["fileinto", "imap4flags"];\n'
        "# generated by autoport's lab\n"
        'if header :contains "X-Spam-Flag" "YES" {\n'
        f'  fileinto "{mailbox_name(("Junk",))}";\n'
        "  stop;\n"
        "}\n"
        f'if address :is "from" "{who}" {{\n'
        '  addflag "\\\\Flagged";\n'
        f'  fileinto "{mailbox_name(("Archive",))}";\n'
        "}\n"
    )
    vacation = (
        'require ["vacation"];\n'
        'vacation :days 7 :subject "Out of office" "I am away until Monday. Ich bin bis Montag weg.";\n'
    )
    return SieveSet({"filters": filters, "vacation": vacation}, "filters")


# --- the benchmark reference mailbox ----------------------------------------------------------------------
# Added for bench/copier_bench.py: 10,000 visible messages, about 423 MB (IMAP sizes), p50 6 KB, p95 128 KB,
# p99 1.1 MB, max 2 MB; \Seen ~90%, \Answered ~13%, \Flagged ~3.5%, keywords ~5%; ten years of dates; UID gaps.

REFERENCE_FOLDERS: tuple[FolderSpec, ...] = (
    FolderSpec(INBOX, True, "", 4300),
    FolderSpec(("Sent",), True, "\\Sent", 1700),
    FolderSpec(("Archive",), True, "\\Archive", 1500),
    FolderSpec(("Archive", "2023"), False, "", 1000),
    FolderSpec(("Projects",), True, "", 600),
    FolderSpec(("Trash",), True, "\\Trash", 450),
    FolderSpec(("Junk",), False, "\\Junk", 350),
    FolderSpec(("Drafts",), True, "\\Drafts", 100),
)
# size quantiles (fraction, bytes), interpolated log-linearly; sampled stratified so the mailbox hits them
_REF_SIZES = (
    (0.0, 700), (0.5, 6_000), (0.8, 17_000), (0.9, 48_000), (0.95, 128_000), (0.99, 1_100_000),
    (0.998, 1_300_000), (1.0, 2_000_000),
)  # fmt: skip
_REF_YEARS = (int(datetime(2015, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()))


def _ref_size(u: float) -> int:
    import itertools
    import math

    for (a, sa), (b, sb) in itertools.pairwise(_REF_SIZES):
        if u <= b:
            t = (u - a) / (b - a)
            return int(math.exp(math.log(sa) + t * (math.log(sb) - math.log(sa))))
    return _REF_SIZES[-1][1]


def reference_plan(address: str = "bench@example.test", seed: int = 1) -> MailboxPlan:
    """The benchmark mailbox's plan (folders with their exact message counts as weights); its messages come
    from reference_messages(), not from MailboxPlan.messages()."""
    rng = _rng(seed, address, "reference")
    count = sum(f.weight for f in REFERENCE_FOLDERS)
    return MailboxPlan(address, seed, count, REFERENCE_FOLDERS, 1_600_000_000 + rng.randrange(0, 1_000_000), [])


def reference_messages(plan: MailboxPlan) -> Iterator[GenMessage]:
    """The benchmark mailbox's messages in folder then UID order (expunged ones included, marked)."""
    rng = _rng(plan.seed, plan.address, "reference-messages")
    n = plan.count
    strata = [(i + 0.5) / n for i in range(n - 1)] + [1.0]
    rng.shuffle(strata)
    sizes = iter(_ref_size(u) for u in strata)
    for spec in plan.folders:
        top = spec.parts[0] if spec.parts else "INBOX"
        lo, hi = _Y2023 if spec.parts == ("Archive", "2023") else _REF_YEARS
        gaps = max(1, spec.weight // 15)
        slots = spec.weight + gaps
        expunged = set(rng.sample(range(slots), gaps))
        dates = sorted(rng.randrange(lo, hi) for _ in range(slots))
        for seq in range(slots):
            gone = seq in expunged
            size = 800 if gone else next(sizes)
            flags: set[str] = set()
            if top in ("Sent", "Drafts") or rng.random() < 0.9:
                flags.add("\\Seen")
            if top != "Drafts" and rng.random() < 0.13:
                flags.add("\\Answered")
            if rng.random() < 0.035:
                flags.add("\\Flagged")
            if top == "Drafts":
                flags.add("\\Draft")
            kws = (rng.choice(("$Forwarded", "$MDNSent", "$NotJunk", *CUSTOM_KEYWORDS)),) if rng.random() < 0.05 else ()
            yield _reference_message(plan, spec.parts, seq, dates[seq], size, frozenset(flags), kws, gone, rng)


def _reference_message(
    plan: MailboxPlan,
    folder: tuple[str, ...],
    seq: int,
    when: int,
    size: int,
    flags: frozenset[str],
    keywords: tuple[str, ...],
    expunged: bool,
    rng: random.Random,
) -> GenMessage:
    digest = hashlib.sha256(f"{plan.seed}:{plan.address}:{folder}:{seq}".encode()).hexdigest()[:20]
    mid = f"{digest}.{when}@bench.example.net"
    other_name, other = _person(rng)
    date = datetime.fromtimestamp(when, UTC)
    head = (
        f"Return-Path: <{other}>\r\nFrom: {_addr_header(other_name, other)}\r\nTo: <{plan.address}>\r\n"
        f"Subject: {rng.choice(_TOPICS)} #{seq}\r\nDate: {format_datetime(date)}\r\nMessage-ID: <{mid}>\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    words = " ".join(rng.choices(_WORDS, k=60)).encode("utf-8")
    if size < 16_000:  # plain text, filled to the size
        head += b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        room = max(0, size - len(head))
        line = words[:72] + b"\r\n"
        body = (line * (room // len(line) + 1))[:room]
        raw = head + body.rstrip(b"\r\n") + b"\r\n"
    else:  # text and a base64 attachment making up the size
        boundary = f"=_bench_{digest}".encode()
        head += b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        text = b"--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + words + b"\r\n"
        att_head = (
            b"--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="data.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        )
        tail = b"--" + boundary + b"--\r\n"
        room = max(0, size - len(head) - len(text) - len(att_head) - len(tail))
        b64 = base64.b64encode(rng.randbytes(room * 3 // 4 * 76 // 78 + 3))
        lines = b"\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + b"\r\n"
        raw = head + text + att_head + lines + tail
    return GenMessage(folder, seq, mid, date, flags, keywords, expunged, raw)

"""copy_account: one account from the legacy server into the target Maildir, initial or delta, resumable.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/copier/engine.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pwd
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, Protocol

from sidecar.legacy.imap import LegacySource, SourceError, SourceParams
from sidecar.legacy.pop3 import LegacyPop3, header_hash, match
from sidecar.migration.copier.folders import LAYOUT, FolderMapper, FolderPlan, TargetLayout
from sidecar.migration.copier.maildir import MaildirAccount, MaildirFolder, Owner
from sidecar.migration.copier.pop3copy import copy_pop3, pop3_order
from sidecar.store.base import FolderMark

log = logging.getLogger("autoport.copier")

Mode = Literal["initial", "delta", "append"]


class CopyStore(Protocol):
    """The part of sidecar.store.base.Store the copier uses (any Store satisfies it)."""

    def folder_marks(self, address: str) -> dict[str, FolderMark]: ...

    def set_folder_mark(self, address: str, mark: FolderMark) -> None: ...

    def clear_folder_marks(self, address: str, folder: str | None = None) -> None: ...

    def set_progress(
        self,
        address: str,
        *,
        total: int | None = None,
        copied: int | None = None,
        bytes_copied: int | None = None,
    ) -> None: ...


@dataclasses.dataclass
class Progress:
    address: str
    folder: str  # legacy folder name
    messages_done: int  # this pass, all folders
    messages_total: int  # legacy message count, all folders (at the start of the pass)
    bytes_done: int


@dataclasses.dataclass
class FolderResult:
    legacy: str
    target: str
    uidvalidity: int = 0
    copied: int = 0
    bytes: int = 0
    expunged: int = 0
    flags_updated: int = 0
    recopied: bool = False  # UIDVALIDITY changed: folder copied again from scratch
    messages: int = 0  # messages in the target folder after the pass
    appended_uids: list[int] = dataclasses.field(default_factory=list)  # append mode: new target UIDs
    matched: int = 0  # append mode, fallback: legacy messages found on the target by Message-ID + size


@dataclasses.dataclass
class CopyResult:
    address: str
    mode: str
    folders: list[FolderResult] = dataclasses.field(default_factory=list)
    subscriptions: list[str] = dataclasses.field(default_factory=list)  # target names
    removed_folders: list[str] = dataclasses.field(default_factory=list)
    pop3_matched: int = 0
    pop3_unmatched: list[str] = dataclasses.field(default_factory=list)  # legacy UIDLs not placed
    lost_keywords: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # folder -> kw -> msgs
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # legacy folder -> why
    seconds: float = 0.0

    @property
    def messages_copied(self) -> int:
        return sum(f.copied for f in self.folders)

    @property
    def bytes_copied(self) -> int:
        return sum(f.bytes for f in self.folders)


ProgressCallback = Callable[[Progress], None]


@dataclasses.dataclass(frozen=True)
class CopyOptions:
    layout: TargetLayout = LAYOUT
    owner: Owner | Literal["vmail"] = "vmail"  # (uid, gid), None (leave as created), or a user name
    folder_overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    batch_messages: int = 200  # commit (fsync + uidlist + watermark) after this many messages
    batch_bytes: int = 32 << 20  # ... or this many bytes
    memory_limit: int = 1 << 20  # bodies above this are spooled to the target folder's tmp/
    lock_timeout: float = 30.0  # append mode: longest wait for Dovecot's uidlist lock (then MaildirLocked)
    connections: int = 1  # IMAP sessions toward the legacy server, folders in parallel (limits.copy_connections)


class _Cancelled(BaseException):
    """Another connection's folder failed: this one stops at its next message (what it committed stays)."""


@dataclasses.dataclass
class _Counts:
    """The running counts of one pass, shared by its connections."""

    total: int = 0
    done: int = 0
    bytes: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class _Pass:
    """What one pass shares across its folders: the legacy session, the store and account it reports to, the
    options, and the running counts (the one writer of progress, to the store and to the callback)."""

    src: LegacySource
    store: CopyStore
    address: str
    opts: CopyOptions
    progress: ProgressCallback | None = None
    counts: _Counts = dataclasses.field(default_factory=_Counts)

    @property
    def total(self) -> int:
        return self.counts.total

    @property
    def done(self) -> int:
        return self.counts.done

    @property
    def bytes(self) -> int:
        return self.counts.bytes

    def counted(self, size: int) -> None:
        with self.counts.lock:
            self.counts.done += 1
            self.counts.bytes += size

    def tick(self, folder: str) -> None:
        if self.counts.cancel.is_set():
            raise _Cancelled
        if self.progress is not None:
            c = self.counts
            self.progress(Progress(self.address, folder, c.done, c.total, c.bytes))

    def save_progress(self, *, start: bool = False) -> None:
        """The store's progress: the total when the pass starts, the counts after that."""
        if start:
            self.store.set_progress(self.address, total=self.total)
        else:
            self.store.set_progress(self.address, copied=self.done, bytes_copied=self.bytes)


def _owner(o: Owner | str) -> Owner:
    if o is None or isinstance(o, tuple):
        return o
    pw = pwd.getpwnam(o)
    return pw.pw_uid, pw.pw_gid


def copy_account(
    source_params: SourceParams,
    target_home: Path,
    store: CopyStore,
    address: str,
    *,
    mode: Mode = "initial",
    progress: ProgressCallback | None = None,
    options: CopyOptions | None = None,
) -> CopyResult:
    """Copy (initial) or update (delta) one account (module doc). Raises SourceError and subclasses."""
    opts = options or CopyOptions()
    started = time.monotonic()
    result = CopyResult(address, mode)
    account = MaildirAccount(target_home, owner=_owner(opts.owner), layout=opts.layout)
    if not source_params.imap_port:
        return _copy_pop3_only(source_params, account, store, address, mode, progress, opts, result, started)
    with LegacySource(source_params) as src:
        account.ensure()
        prefix, sep = src.namespace()
        # only the user's own mailbox: other users' and shared namespaces (an admin login on Cyrus lists
        # user.*; a Dovecot shared namespace lists user/bob/...) are never copied into it; they are reported
        spaces = src.namespaces()
        listing = []
        for f in src.list_folders():
            where = spaces.foreign(f.name)
            if where is None:
                listing.append(f)
            elif f.selectable:  # (a namespace's own \Noselect levels, "user" or "Public", are not folders)
                result.skipped[f.name] = f"{where} namespace: not the user's own mailbox"
        mapper = FolderMapper(
            sep or (listing[0].delimiter if listing else None), prefix, opts.folder_overrides, opts.layout
        )
        plans = mapper.plan(listing)
        plans.sort(key=lambda p: (p.target != "INBOX",))
        for f in listing:
            if not f.selectable:
                result.skipped[f.name] = "not selectable"
        marks = store.folder_marks(address)
        ctx = _Pass(src, store, address, opts, progress)
        for plan in plans:
            ctx.counts.total += src.status(plan.legacy).exists
        ctx.save_progress(start=True)

        inbox: MaildirFolder | None = None
        if mode == "append":
            done = [_append_folder(ctx, account, plan, marks.get(plan.legacy)) for plan in plans]
        else:
            done = _copy_folders(ctx, account, plans, marks)
        for plan, (fres, folder) in zip(plans, done, strict=True):
            result.folders.append(fres)
            if folder.lost_keywords:
                result.lost_keywords[plan.target] = dict(folder.lost_keywords)
            if plan.target == "INBOX":
                inbox = folder

        by_legacy = {p.legacy: p.target for p in plans}
        # append mode: subscriptions and folders belong to the user now
        # subscriptions: legacy LSUB mapped through the same plan (unknown names mapped by name)
        subs = []
        for name in src.subscribed() if mode != "append" else []:
            if spaces.foreign(name) is not None:
                continue
            target = by_legacy.get(name)
            if target is None:
                try:
                    target = mapper.plain_target(name)
                except ValueError:
                    continue
            subs.append(target)
        if mode != "append":
            account.write_subscriptions(subs)
            result.subscriptions = sorted(set(subs))

        if mode == "delta":
            # folders gone from the legacy side go from the target too; the special folders stay (Dovecot
            # creates them itself, auto = subscribe)
            wanted = {p.target for p in plans} | {"INBOX"} | {name for _use, name in opts.layout.special}
            for target in account.folders():
                if target not in wanted:
                    account.remove_folder(target)
                    result.removed_folders.append(target)
            for legacy_name in marks:
                if legacy_name not in by_legacy:
                    store.clear_folder_marks(address, legacy_name)

    if source_params.pop3_port and inbox is not None and mode != "append":
        matched, unmatched = _pop3_uidls(source_params, inbox)
        result.pop3_matched, result.pop3_unmatched = matched, unmatched
    ctx.save_progress()
    result.seconds = time.monotonic() - started
    log.info(
        "%s: %s pass copied %d messages (%d bytes) in %.1fs",
        address,
        mode,
        result.messages_copied,
        result.bytes_copied,
        result.seconds,
    )
    return result


def _copy_pop3_only(
    params: SourceParams,
    account: MaildirAccount,
    store: CopyStore,
    address: str,
    mode: Mode,
    progress: ProgressCallback | None,
    opts: CopyOptions,
    result: CopyResult,
    started: float,
) -> CopyResult:
    """A legacy server without IMAP: INBOX over POP3 (pop3copy.py)."""
    if not params.pop3_port:
        raise SourceError("the legacy server has neither IMAP nor POP3 configured (legacy.imap_port, pop3_port)")
    counters = {"done": 0, "bytes": 0}

    def tick(folder: str, n: int, size: int, total: int) -> None:
        counters["done"] += n
        counters["bytes"] += size
        if progress is not None:
            progress(Progress(address, folder, counters["done"], total, counters["bytes"]))

    account.ensure()
    result.folders.append(copy_pop3(params, account, store, address, mode, opts, tick))
    store.set_progress(address, copied=counters["done"], bytes_copied=counters["bytes"])
    result.seconds = time.monotonic() - started
    log.info("%s: %s pass over POP3 copied %d messages (%d bytes) in %.1fs", address, mode,
             result.messages_copied, result.bytes_copied, result.seconds)  # fmt: skip
    return result


def _copy_folders(
    ctx: _Pass, account: MaildirAccount, plans: list[FolderPlan], marks: dict[str, FolderMark]
) -> list[tuple[FolderResult, MaildirFolder]]:
    """Every folder of the plan, in plan order, over up to opts.connections sessions at once (each folder on
    one session, whole; the sessions take the next folder as they finish one). Extra sessions open only while
    the node's legacy connection cap has room (no wait) and are simply done without when they cannot: the copy
    is the same either way, only its wall time differs. A folder that fails stops the others at their next
    message (what they committed stays: the resume point) and its error is raised."""
    extra: list[LegacySource] = []
    with contextlib.ExitStack() as stack:
        for _ in range(min(ctx.opts.connections, len(plans)) - 1):
            more = LegacySource(ctx.src.params, wait=0)
            try:
                more.connect()
            except SourceError as e:  # the cap is reached, or the server refuses more sessions: fine
                log.info("%s: copying over %d legacy session(s), not more: %s", ctx.address, 1 + len(extra), e)
                break
            stack.callback(more.close)
            extra.append(more)
        if not extra:
            return [_copy_folder(ctx, account, plan, marks.get(plan.legacy)) for plan in plans]
        results: list[tuple[FolderResult, MaildirFolder] | None] = [None] * len(plans)
        errors: list[BaseException] = []
        todo = iter(range(len(plans)))
        take = threading.Lock()

        def work(wctx: _Pass) -> None:
            try:
                while not ctx.counts.cancel.is_set():
                    with take:
                        i = next(todo, None)
                    if i is None:
                        return
                    results[i] = _copy_folder(wctx, account, plans[i], marks.get(plans[i].legacy))
            except BaseException as e:  # handed to the calling thread, raised there
                if not isinstance(e, _Cancelled):
                    errors.append(e)
                ctx.counts.cancel.set()

        threads = [
            threading.Thread(target=work, args=(dataclasses.replace(ctx, src=s),), name=f"copy-{ctx.address}-{n}")
            for n, s in enumerate(extra, 1)
        ]
        for t in threads:
            t.start()
        work(ctx)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def _copy_folder(
    ctx: _Pass, account: MaildirAccount, plan: FolderPlan, mark: FolderMark | None
) -> tuple[FolderResult, MaildirFolder]:
    src, store, address = ctx.src, ctx.store, ctx.address
    status = src.examine(plan.legacy)
    fres = FolderResult(plan.legacy, plan.target, status.uidvalidity)
    folder = account.folder(plan.target).open()
    stale_mark = mark is not None and mark.uidvalidity != status.uidvalidity
    if (folder.uidvalidity and folder.uidvalidity != status.uidvalidity) or stale_mark:
        log.warning(
            "%s: %s UIDVALIDITY changed (%s -> %d): copying it again",
            address,
            plan.legacy,
            folder.uidvalidity or (mark.uidvalidity if mark else 0),
            status.uidvalidity,
        )
        store.clear_folder_marks(address, plan.legacy)
        folder.reset(status.uidvalidity, status.uidnext)
        fres.recopied = True
    folder.set_header(status.uidvalidity, status.uidnext)

    def set_mark() -> None:
        store.set_folder_mark(
            address, FolderMark(plan.legacy, status.uidvalidity, folder.last_uid, len(folder.records))
        )

    # flags and expunges for what is already on the target
    legacy_flags = src.uid_flags("1:*") if folder.records and status.exists else {}
    if folder.records:
        for uid in sorted(folder.records):
            if uid not in legacy_flags:
                folder.expunge(uid)
                fres.expunged += 1
            elif folder.set_flags(uid, legacy_flags[uid]):
                fres.flags_updated += 1
    folder.commit()
    set_mark()

    # new messages
    last = folder.last_uid
    if status.exists and (status.uidnext == 0 or status.uidnext > last + 1):
        try:
            _fetch_new(ctx, folder, plan, last, fres, set_mark)
        except BaseException:
            folder.abort()  # nothing staged becomes visible; committed batches stay (resume point)
            with contextlib.suppress(Exception):  # the batch that was in flight may have become durable meanwhile
                set_mark()
            raise
    fres.messages = len(folder.records)
    return fres, folder


def _fetch_new(
    ctx: _Pass, folder: MaildirFolder, plan: FolderPlan, last: int, fres: FolderResult, set_mark: Callable[[], None]
) -> None:
    src, opts = ctx.src, ctx.opts
    batch_bytes = 0
    for msg in src.fetch(f"{last + 1}:*", spool_dir=folder.tmp_dir, memory_limit=opts.memory_limit):
        if msg.uid is None or msg.uid <= last or msg.body is None:
            if msg.body is not None:
                msg.body.discard()
            continue  # "N:*" also answers the highest UID when it is below N
        size = folder.stage(msg.uid, msg.body, msg.flags or (), msg.internaldate)
        last = msg.uid
        fres.copied += 1
        fres.bytes += size
        batch_bytes += size
        ctx.counted(size)
        if folder.pending >= opts.batch_messages or batch_bytes >= opts.batch_bytes:
            # this batch goes to the disk on a thread of its own while the next one arrives; the commit waits
            # for the previous batch first, so the mark names that one, never a batch still in flight
            folder.commit(background=True)
            set_mark()
            ctx.save_progress()
            batch_bytes = 0
        ctx.tick(plan.legacy)
    folder.commit()
    set_mark()


def _append_folder(
    ctx: _Pass, account: MaildirAccount, plan: FolderPlan, mark: FolderMark | None
) -> tuple[FolderResult, MaildirFolder]:
    """Append mode for one folder (module doc): legacy messages above the watermark, new UIDs, under lock."""
    src, store, address, opts = ctx.src, ctx.store, ctx.address, ctx.opts
    status = src.examine(plan.legacy)
    fres = FolderResult(plan.legacy, plan.target, status.uidvalidity)
    folder = account.folder(plan.target).open_shared()
    known: set[tuple[str, int]] | None = None
    if mark is not None and mark.uidvalidity == status.uidvalidity:
        watermark = mark.last_uid
    else:
        watermark = 0
        known = {
            _identity(folder.read_header(uid), folder.file_vsize(uid))
            for uid, rec in folder.records.items()
            if rec.subdir  # a file Dovecot is just expunging has none
        }
        known.discard(("", 0))
    tags = folder.legacy_tags(status.uidvalidity)
    watermark = max(watermark, max(tags, default=0))
    last = watermark

    def commit() -> None:
        fres.appended_uids += folder.commit_append(status.uidvalidity, opts.lock_timeout)
        store.set_folder_mark(
            address, FolderMark(plan.legacy, status.uidvalidity, last, len(folder.records))
        )

    if status.exists and (status.uidnext == 0 or status.uidnext > watermark + 1):
        try:
            batch_bytes = 0
            for msg in src.fetch(
                f"{watermark + 1}:*", spool_dir=folder.tmp_dir, memory_limit=opts.memory_limit
            ):
                if msg.uid is None or msg.uid <= watermark or msg.body is None:
                    if msg.body is not None:
                        msg.body.discard()
                    continue
                if known is not None:
                    ident = _identity(msg.body.head(1 << 18), msg.body.vsize)
                    if ident in known:
                        msg.body.discard()
                        fres.matched += 1
                        last = msg.uid
                        continue
                size = folder.stage_append(
                    msg.body, msg.flags or (), msg.internaldate, (status.uidvalidity, msg.uid)
                )
                last = msg.uid
                fres.copied += 1
                fres.bytes += size
                batch_bytes += size
                ctx.counted(size)
                if folder.pending >= opts.batch_messages or batch_bytes >= opts.batch_bytes:
                    commit()
                    batch_bytes = 0
                ctx.tick(plan.legacy)
            # everything below UIDNEXT has been looked at: the sweep's STATUS check (sidecar.migration.sweep)
            # need not come back for newest messages that were expunged on the legacy side
            last = max(last, status.uidnext - 1)
            commit()
        except BaseException:
            folder.abort()
            raise
    elif mark is None or mark.uidvalidity != status.uidvalidity or mark.last_uid != last:
        store.set_folder_mark(address, FolderMark(plan.legacy, status.uidvalidity, last, len(folder.records)))
    fres.messages = len(folder.records)
    return fres, folder


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _identity(header: bytes, size: int) -> tuple[str, int]:
    """(Message-ID, size with CRLF line ends) for the append-mode fallback; ("", 0) without a Message-ID."""
    end = header.find(b"\r\n\r\n")
    if end < 0:
        end = header.find(b"\n\n")
    m = _MESSAGE_ID.search(header if end < 0 else header[:end])
    if not m:
        return "", 0
    return " ".join(m.group(1).decode("utf-8", "replace").split()), size


def _pop3_uidls(params: SourceParams, inbox: MaildirFolder) -> tuple[int, list[str]]:
    """Give INBOX messages without a P field the legacy POP3 UIDL; returns (matched now, unmatched UIDLs)."""
    known = {r.pop3_uidl for r in inbox.records.values() if r.pop3_uidl}
    todo = {uid: inbox.read_header(uid) for uid, r in inbox.records.items() if not r.pop3_uidl}
    imap_hashes = {uid: header_hash(h) for uid, h in todo.items()}
    with LegacyPop3(params) as pop:
        listing = pop.messages()
        msgs = [m for m in listing if m.uidl not in known] if todo else []
        pop_hashes = [(m.uidl, pop.header_hash(m.number)) for m in msgs]
    res = match(pop_hashes, imap_hashes)
    for uid, uidl in res.uidls.items():
        inbox.set_pop3_uidl(uid, uidl)
    # the legacy POP3 order, where it is not the UID order (Courier numbers POP3 messages its own way)
    pop3_order(inbox, [m.uidl for m in listing])
    inbox.commit()
    return len(res.uidls), res.unmatched_pop3

"""The job runner: leases copy jobs from the store and walks each account along its path.

    copying  --initial copy-->  cutover (mail held)  --final delta-->  migrated (held mail released,
                                                                        proxied sessions kicked)

Leases: a job is leased for `limits.lease_seconds` and renewed while it runs; a node that dies loses its
lease and another node (or this one after a restart) takes the job over. Every step is idempotent: the
copier resumes from what is durable in the target, a transition that already happened is not repeated.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/jobs.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config import Config
from sidecar.mta import commands
from sidecar.states import IllegalTransition, State, is_held, is_local
from sidecar.store.base import Conflict, Job, Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from sidecar.legacy.limit import LegacyLimiter
    from sidecar.migration.copier import CopyResult

log = logging.getLogger("sidecar.migration.jobs")

# how long a job without credentials waits before it looks again (a login re-queues it at once)
CREDENTIAL_WAIT = 300.0
POLL_INTERVAL = 1.0
BACKOFF_BASE = 30.0
BACKOFF_MAX = 3600.0
BUSY_RETRY = 15.0  # seconds before a job that found every legacy connection taken tries again (no attempt counted)
KINDS = ("copy", "sweep")
# jobs that may wait (cutover grace, route caches, held-mail release) per copy slot, without holding it
WAITING_PER_SLOT = 8


class Credentials(Protocol):
    def get(self, address: str) -> Any: ...

    def pop(self, address: str) -> Any: ...


@dataclass(frozen=True)
class Hooks:
    """What the runner does around the copy; replaceable in tests."""

    release_held: Callable[[str], int]  # deliver the held mail of an account that left cutover
    after_migrated: Callable[[str, list[str]], None]  # flush auth caches, kick proxied sessions, warm indexes
    # in cutover, before the final delta: no proxied session and no mail in flight toward legacy on any node
    # (sidecar.migration.cutover.quiesce; raises KickTimeout). None: only wait limits.cutover_grace
    quiesce: Callable[[str, list[str]], None] | None = None


NO_CREDENTIALS = (
    "no credentials: the password is kept in memory for an hour after a login through autoport (and not across "
    "a restart), and no legacy admin credentials are configured; set [legacy] admin_user and admin_password"
)
REFUSED = (
    "the legacy server refused the credentials (password changed there, or admin credentials wrong); check "
    "[legacy] admin_user, admin_password and admin_mode (`autoport doctor`)"
)


def _changed(source: Any, store: Store, address: str) -> list[str]:
    from sidecar.migration.sweep import changed_folders

    return changed_folders(source, store, address)


class Slots:
    """At most `size` jobs do copy work (read the legacy server, write Maildirs) at once on this node.

    A job only waiting (cutover grace, Postfix's route cache, the release of held mail) gives its slot back
    and takes one again for its final delta, ahead of new jobs: its mail is held meanwhile. Slots are counts,
    not locks: any thread may give back what another took.
    """

    def __init__(self, size: int, *, on_free: Callable[[], None] | None = None) -> None:
        self.size = max(1, size)
        self.on_free = on_free
        self._used = 0
        self._returning = 0  # jobs waiting to take a slot back (served before new jobs)
        self._cond = threading.Condition()

    def in_use(self) -> int:
        with self._cond:
            return self._used

    def try_take(self) -> bool:
        """A slot for a new job: only when one is free and no waiting job wants one back."""
        with self._cond:
            if self._used >= self.size or self._returning:
                return False
            self._used += 1
            return True

    def take(self, stopping: threading.Event | None = None) -> None:
        """Wait for a slot, ahead of new jobs; InterruptedError when `stopping` is set meanwhile."""
        with self._cond:
            self._returning += 1
            try:
                while self._used >= self.size:
                    if stopping is not None and stopping.is_set():
                        raise InterruptedError("sidecar stopping")
                    self._cond.wait(POLL_INTERVAL)
                self._used += 1
            finally:
                self._returning -= 1

    def give(self, *, wake: bool = True) -> None:
        """Give a slot back; wake: tell on_free (the runner looks for the next job at once)."""
        with self._cond:
            self._used = max(0, self._used - 1)
            self._cond.notify()
        if wake and self.on_free is not None:
            self.on_free()


class Slot:
    """One job's hold on a copy slot: given back once (give()), or for the length of a wait (away())."""

    def __init__(self, slots: Slots, stopping: threading.Event | None = None) -> None:
        self.slots = slots
        self.stopping = stopping
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.slots.give()

    @contextlib.contextmanager
    def away(self) -> Iterator[None]:
        """Wait without the slot; taken again when the wait returns (not when it raises: the job ends then)."""
        self.give()
        yield
        self.slots.take(self.stopping)
        self.held = True


class WaitForCredentials(Exception):
    """No password in memory and no admin credentials: the job waits for the user's next login."""


def backoff(failures: int) -> float:
    """Seconds before the next attempt after `failures` consecutive failures (30 s, 60 s, ... 1 h)."""
    return float(min(BACKOFF_MAX, BACKOFF_BASE * (2 ** max(0, failures - 1))))


def default_hooks(cfg: Config, store: Store, *, poke: Callable[[], None] | None = None) -> Hooks:
    """The real hooks; `poke` wakes this node's NodeAgent (sidecar.migration.cutover) when a kick is asked."""

    def release(address: str) -> int:
        try:
            from sidecar.migration.release import release_held

            return int(release_held(cfg, store, address))
        except Exception as e:  # held mail is still delivered at the next queue run
            log.warning("releasing held mail of %s failed (%s); it goes out at the next queue run", address, e)
            return 0

    def after(address: str, logins: list[str]) -> None:
        from sidecar.migration.cutover import account_names, flush_everywhere

        # Dovecot's auth cache may hold "unknown user" for the sql steps from the logins before: forget it on
        # every node, so the next login is native (store down: logged; the cached answer only sends logins to
        # the sidecar, which checks them against the stored hash, until auth_cache_negative_ttl)
        try:
            flush_everywhere(cfg, store, address, account_names(store, address, logins), poke=poke)
        except StoreError as e:
            log.warning("%s: auth cache flush on every node not requested: %s", address, e)
        doveadm, conf = cfg.target.doveadm, cfg.target.dovecot_config
        # proxied sessions of this user reconnect, now to the local mailbox (one doveadm run)
        with contextlib.suppress(commands.CommandError):
            commands.proxy_kick(doveadm, conf, *sorted(set(logins) | {address}))
        # warm Dovecot's index so the first local login does not pay for it
        with contextlib.suppress(commands.CommandError):
            commands.index_mailboxes(doveadm, conf, address)

    def quiesce(address: str, logins: list[str]) -> None:
        from sidecar.migration.cutover import quiesce

        quiesce(cfg, store, address, logins, poke=poke)

    return Hooks(release_held=release, after_migrated=after, quiesce=quiesce)


class JobRunner:
    """Leases copy jobs and runs them on a bounded pool of threads."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        credentials: Credentials,
        *,
        owner: str = "",
        hooks: Hooks | None = None,
        copy: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.time,
        sieve: Callable[[str, Any], None] | None = None,
        sweep_check: Callable[[Any, Store, str], list[str]] | None = None,
        limiter: LegacyLimiter | None = None,
    ) -> None:
        self.cfg = cfg
        self.limiter = limiter  # this node's cap on legacy connections and bytes (sidecar/legacy/limit.py)
        self.store = store
        self.credentials = credentials
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.hooks = hooks or default_hooks(cfg, store)
        self._copy = copy
        # Sieve scripts (sidecar.migration.sieve) after the initial copy; an injected `copy` (tests) runs without them
        self._sieve = sieve if sieve is not None else (None if copy is not None else self._copy_sieve)
        # the sweep's STATUS check before any FETCH (sidecar.migration.sweep); an injected `copy` runs without it
        self._sweep_check = sweep_check if sweep_check is not None else (None if copy is not None else _changed)
        self.clock = clock
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        # copy_concurrency jobs copy at once; more may wait meanwhile (Slots), each on a thread of its own
        self.slots = Slots(cfg.limits.copy_concurrency, on_free=self.poke)
        self.max_jobs = self.slots.size * (1 + WAITING_PER_SLOT)
        self.pool = ThreadPoolExecutor(max_workers=self.max_jobs, thread_name_prefix="copy")
        self.running: dict[int, Future[None]] = {}
        self.thread: threading.Thread | None = None
        self.stats = {"started": 0, "migrated": 0, "retried": 0, "failed": 0, "waiting": 0}

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wakeup.set()
        if self.thread:
            self.thread.join(timeout)
        # running copies see `stopping` at their next message and hand their job back (retry at once)
        futures.wait(list(self.running.values()), timeout=timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def poke(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self.wakeup.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.running = {k: f for k, f in self.running.items() if not f.done()}
            leased = False
            if len(self.running) < self.max_jobs and self.slots.try_take():
                try:
                    job = self.store.lease(self.owner, kinds=KINDS, seconds=self.cfg.limits.lease_seconds)
                except StoreError as e:
                    log.warning("job lease failed: %s", e)
                    job = None
                if job is not None:
                    leased = True
                    self.running[job.id] = self.pool.submit(self._run_guarded, job, Slot(self.slots, self.stopping))
                else:
                    self.slots.give(wake=False)  # nothing to run: the loop waits for a poke or the poll
            if not leased:
                self.wakeup.wait(POLL_INTERVAL)
                self.wakeup.clear()

    # --- one job ------------------------------------------------------------------------------------------
    def _run_guarded(self, job: Job, slot: Slot | None = None) -> None:
        renewer = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(job, renewer), daemon=True)
        heart.start()
        try:
            self.run_job(job, slot)
        except Exception as e:
            # Counted like any failure (failed after copy_attempts). Logged by type and place only: an
            # exception's text can carry what it was given (a UnicodeEncodeError names password characters).
            where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
            log.error("job %d for %s crashed: %s%s", job.id, job.address, type(e).__name__, at)
            try:
                self._failure(job, f"internal error ({type(e).__name__}{at})")
            except Exception as again:  # the store is gone too: the lease expires and the job runs again
                log.error("job %d for %s: recording the crash failed: %s", job.id, job.address, type(again).__name__)
        finally:
            renewer.set()

    def _heartbeat(self, job: Job, done: threading.Event) -> None:
        interval = max(1.0, self.cfg.limits.lease_seconds / 3)
        while not done.wait(interval):
            with contextlib.suppress(StoreError):
                if not self.store.renew(job.id, self.owner, seconds=self.cfg.limits.lease_seconds):
                    log.warning("lost the lease of job %d (%s)", job.id, job.address)
                    return

    def _source(self, address: str) -> Any:
        from sidecar.migration.copier import SourceParams

        cred = self.credentials.get(address)
        if cred is not None:
            return SourceParams.from_config(self.cfg.legacy, cred.login, cred.password, limiter=self.limiter)
        if self.cfg.legacy.admin_user and self.cfg.legacy.admin_password:
            # the same legacy login the password check uses (sidecar.auth.logins): the template over the
            # account's imported login, else its address; never a login name someone once typed
            from sidecar.auth.logins import legacy_login

            imported = self.store.find_imported(address)
            name = imported.login if imported is not None and imported.address == address else address
            login = legacy_login(self.cfg.legacy.login_template, name, address)
            return SourceParams.from_config(self.cfg.legacy, login, use_admin=True, limiter=self.limiter)
        raise WaitForCredentials(address)

    def _copy_pass(self, address: str, mode: str, source: Any) -> CopyResult:
        from sidecar.migration.copier import Progress, copy_account, target_home

        copy: Callable[..., Any] = self._copy or copy_account
        home = target_home(self.cfg.target.mail_root, address)

        def progress(p: Progress) -> None:
            if self.stopping.is_set():
                raise InterruptedError("sidecar stopping")
            if p.messages_done % 200 == 0 or p.messages_done == p.messages_total:
                with contextlib.suppress(StoreError):
                    self.store.set_progress(address, copied=p.messages_done, bytes_copied=p.bytes_done)

        kw: dict[str, Any] = {}
        if self.cfg.limits.copy_connections > 1:  # folders in parallel (engine._copy_folders)
            from sidecar.migration.copier import CopyOptions

            kw["options"] = CopyOptions(connections=self.cfg.limits.copy_connections)
        result: CopyResult = copy(source, home, self.store, address, mode=mode, progress=progress, **kw)
        log.info("copy %s of %s: %d new messages in %.1f s", mode, address, result.messages_copied, result.seconds)
        if mode != "append":  # other users' and shared folders this login saw and the copier left out: reported
            foreign = {k: v for k, v in result.skipped.items() if "namespace" in v}
            with contextlib.suppress(StoreError):
                self.store.set_inventory(f"mailbox:{address}", "shared-folder", foreign)
        return result

    def _copy_sieve(self, address: str, source: Any) -> None:
        from sidecar.migration.sieve import copy_for_account

        copy_for_account(self.cfg, self.store, address, source)

    def run_job(self, job: Job, slot: Slot | None = None) -> None:
        """Run one leased job holding `slot` (None: take one here, waiting for it); the slot is given back."""
        if slot is None:
            self.slots.take(self.stopping)
            slot = Slot(self.slots, self.stopping)
        try:
            if job.kind == "sweep":
                self.run_sweep(job)
            else:
                self.run_copy(job, slot)
        finally:
            slot.give()

    def run_sweep(self, job: Job) -> None:
        """Trailing sweep: append mail that still lands in a migrated account's legacy mailbox (legacy-side
        aliases, lists, forwards, its queue) to the target, once; every hit is recorded for the report."""
        from sidecar.migration.copier import SourceAuthError, SourceError

        address = job.address
        account = self.store.get(address)
        if account is None or not is_local(account.state):
            self.store.finish(job.id, self.owner)
            return
        if not self._sweeping(account.migrated_at):
            self.store.clear_sweep_block(address)
            self.store.finish(job.id, self.owner)
            return
        try:
            source = self._source(address)
        except WaitForCredentials:
            # the password left memory (an hour after the login, or a restart) and there are no admin
            # credentials: recorded, shown by `report`, refused by `finalize --check`; looked at again later
            self._sweep_blocked(job, NO_CREDENTIALS)
            return
        try:
            if self._sweep_check is not None and not self._sweep_check(source, self.store, address):
                self.store.clear_sweep_block(address)
                self.store.finish(job.id, self.owner, retry_at=self.clock() + self.cfg.limits.sweep_interval)
                return
            result = self._copy_pass(address, "append", source)
        except SourceAuthError:
            self.credentials.pop(address)
            self._sweep_blocked(job, REFUSED)
            return
        except (SourceError, OSError) as e:
            self.store.finish(job.id, self.owner, error=str(e), retry_at=self.clock() + self.cfg.limits.sweep_interval)
            return
        self.store.clear_sweep_block(address)
        hits = result.messages_copied
        if hits:
            where = ", ".join(f"{f.target}: {f.copied}" for f in result.folders if f.copied)
            self.store.record_event(address, "sweep-hit", f"{hits} message(s) arrived on the legacy server after "
                                    f"cutover ({where}); a legacy-side rule or queue still delivers there")
            log.warning("trailing sweep of %s found %d message(s) on the legacy server (%s)", address, hits, where)
        # the same job goes back to the queue in one statement: if the store fails here, the lease expires and
        # the sweep runs again; sweeps never stop silently
        if self._sweeping(account.migrated_at):
            self.store.finish(job.id, self.owner, retry_at=self.clock() + self.cfg.limits.sweep_interval)
        else:
            self.store.finish(job.id, self.owner)

    def _sweep_blocked(self, job: Job, reason: str) -> None:
        address = job.address
        if address not in {b.address for b in self.store.sweep_blocks()}:
            self.store.record_event(address, "sweep-blocked", reason)
            log.warning("trailing sweep of %s cannot run: %s", address, reason)
        self.store.set_sweep_block(address, reason)
        self.store.finish(job.id, self.owner, error=reason, retry_at=self.clock() + self.cfg.limits.sweep_interval)

    def _sweeping(self, migrated_at: float | None) -> bool:
        window = self.cfg.limits.sweep_window
        return not (window and migrated_at and self.clock() > migrated_at + window)

    def _schedule_sweep(self, address: str, migrated_at: float | None) -> None:
        if self._sweeping(migrated_at):
            self.store.enqueue(address, "sweep", not_before=self.clock() + self.cfg.limits.sweep_interval)

    def run_copy(self, job: Job, slot: Slot) -> None:
        from sidecar.migration.copier import SourceAuthError, SourceBusy, SourceError

        address = job.address
        started = time.monotonic()
        self.stats["started"] += 1
        try:
            account = self.store.get(address)
            if account is not None and is_local(account.state):
                # a node died after the switch but before the steps after it: they are idempotent, redo them
                slot.give()  # nothing left to copy: releasing held mail only waits on Postfix
                self.hooks.release_held(address)
                self.hooks.after_migrated(address, list(account.logins))
                self._schedule_sweep(address, account.migrated_at)
                self.store.finish(job.id, self.owner)
                return
            if account is None or account.state is State.DISCOVERED:
                self.store.finish(job.id, self.owner)
                return
            if account.state is State.FAILED:
                self.store.transition(address, State.COPYING, expect=State.FAILED, reason="retry")
                account = self.store.get(address)
                assert account is not None
            try:
                # taken once: the credentials must not expire between the initial copy and the final delta
                source = self._source(address)
            except WaitForCredentials:
                if account.state is State.CUTOVER:
                    # resumed after a restart with the password gone: fail toward legacy, never hold mail forever
                    self.store.transition(address, State.FAILED, expect=State.CUTOVER, reason="credentials lost")
                    self.hooks.release_held(address)
                    self.store.finish(job.id, self.owner, error="credentials lost during cutover")
                    log.warning("%s: credentials lost during cutover; back on the legacy server until next login",
                                address)
                    return
                raise
            copied_bytes = account.bytes_copied
            if account.state is State.COPYING:
                initial = self._copy_pass(address, "initial", source)
                copied_bytes = sum(f.bytes for f in initial.folders)
                if self._sieve is not None and self.cfg.legacy.sieve_port:
                    self._sieve(address, source)
                account = self.store.transition(address, State.CUTOVER, expect=State.COPYING,
                                                reason="initial copy done")  # fmt: skip
                self.store.record_event(address, "cutover", "mail held while the final delta runs")
            # in cutover (now, or again after a restart): nothing may write to the legacy mailbox any more
            if not self._quiesce(job, account, slot):
                return
            self._copy_pass(address, "delta", source)
            account = self.store.transition(address, State.MIGRATED, expect=State.CUTOVER, reason="final delta done")
            slot.give()  # the rest waits on Postfix and Dovecot (held-mail release, kicks): the next copy starts
            self.store.set_progress(address, copied=account.messages_total, bytes_copied=copied_bytes)
            self.store.set_error(address, "")
            released = self.hooks.release_held(address)
            self.hooks.after_migrated(address, list(account.logins))
            self.store.record_event(address, "migrated", f"{released} held message(s) released")
            # the first sweep is queued before the copy job closes: a failure in between re-runs the job
            self._schedule_sweep(address, account.migrated_at)
            self.store.finish(job.id, self.owner)
            self.stats["migrated"] += 1
            took = time.monotonic() - started
            log.info("%s migrated in %.1f s; %d held message(s) released", address, took, released)
        except WaitForCredentials:
            self.stats["waiting"] += 1
            log.info("copy of %s waits for the user's next login (no credentials in memory)", address)
            retry = self.clock() + CREDENTIAL_WAIT
            self.store.finish(job.id, self.owner, error="waiting for credentials", retry_at=retry)
        except SourceAuthError:
            self.credentials.pop(address)
            log.warning("legacy server refused the stored credentials of %s; waiting for the next login", address)
            self.store.finish(job.id, self.owner, error="credentials refused", retry_at=self.clock() + CREDENTIAL_WAIT)
        except InterruptedError:
            self.store.finish(job.id, self.owner, error="interrupted", retry_at=self.clock())
        except SourceBusy as e:
            # this node's legacy connections are all taken (limits.legacy_connections): not the account's fault
            log.info("copy of %s waits: %s", address, e)
            with contextlib.suppress(StoreError):
                self.store.finish(job.id, self.owner, error="legacy connections busy",
                                  retry_at=self.clock() + BUSY_RETRY)  # fmt: skip
        except (Conflict, IllegalTransition) as e:
            # another node moved the account: it owns the rest of the path
            log.info("%s: %s; leaving it to whoever moved it", address, e)
            with contextlib.suppress(StoreError):
                self.store.finish(job.id, self.owner)
        except (SourceError, OSError, StoreUnavailable) as e:
            self._failure(job, f"{type(e).__name__}: {e}")

    def _quiesce(self, job: Job, account: Any, slot: Slot) -> bool:
        """No proxied session and no mail in flight toward legacy on any node; False: the cutover failed toward
        legacy (a node did not confirm) and the job was put back for a later retry. The copy slot is given
        back for the wait and taken again, ahead of new jobs, for the final delta (Slots)."""
        from sidecar.migration.cutover import KickTimeout

        address = account.address
        if self.hooks.quiesce is None:
            # mail already handed to the legacy relay before the switch lands there; let it settle
            with slot.away():
                self.stopping.wait(self.cfg.limits.cutover_grace)
            return True
        try:
            with slot.away():
                self.hooks.quiesce(address, list(account.logins))
        except KickTimeout as e:
            log.warning("%s: %s; back on the legacy server, the cutover is retried later", address, e)
            self.store.transition(address, State.FAILED, expect=State.CUTOVER, reason=f"cutover: {e}")
            self.hooks.release_held(address)
            self.store.set_error(address, f"cutover: {e}")
            retry = self.clock() + backoff(max(1, job.attempts))
            self.store.finish(job.id, self.owner, error=f"cutover: {e}", retry_at=retry)
            return False
        self.store.record_event(address, "quiesced", "no proxied session and no mail in flight on any node; "
                                "the final delta reads the legacy mailbox now")  # fmt: skip
        return True

    def _failure(self, job: Job, reason: str) -> None:
        address = job.address
        with contextlib.suppress(StoreError):
            self.store.set_error(address, reason)
        account = None
        with contextlib.suppress(StoreError):
            account = self.store.get(address)
        failures = account.attempts if account else 1
        if account is not None and failures >= self.cfg.limits.copy_attempts:
            self.stats["failed"] += 1
            log.error("copy of %s failed %d times, giving up: %s (user stays on the legacy server)", address,
                      failures, reason)
            was_held = is_held(account.state)
            with contextlib.suppress(StoreError, IllegalTransition):
                self.store.transition(address, State.FAILED, reason=reason)
            if was_held:  # held mail goes back to the legacy relay now
                self.hooks.release_held(address)
            with contextlib.suppress(StoreError):
                self.store.finish(job.id, self.owner, error=reason)
            return
        self.stats["retried"] += 1
        delay = backoff(failures)
        log.warning("copy of %s failed (%s); retry %d in %.0f s", address, reason, failures, delay)
        with contextlib.suppress(StoreError):
            self.store.finish(job.id, self.owner, error=reason, retry_at=self.clock() + delay)

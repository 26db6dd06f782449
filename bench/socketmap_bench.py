"""Socketmap throughput: real Postfix clients (`postmap -q -`, one connection each, one request at a time,
as Postfix's own daemons ask) against `start_socketmap_server` backed by a SQLite read per lookup.

    .venv/bin/python bench/socketmap_bench.py [--clients 8] [--keys 20000] [--cache-ttl 0] [--inline]

Prints lookups/s over all clients. The store is a stand-in with the cost of the real hot path: one indexed
`SELECT state FROM accounts WHERE address = ?` on a SQLite file with 10,000 accounts, one connection per thread.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import resource
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from sidecar.auth.routing import RoutingPolicy
from sidecar.config import Config
from sidecar.edge.socketmap import start_socketmap_server
from sidecar.states import State


class SqliteStateStore:
    """Only what routing needs: state_of() as one indexed SELECT."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = sqlite3.connect(self.path)
        return db

    def state_of(self, address: str) -> State | None:
        row = self._db().execute("SELECT state FROM accounts WHERE address = ?", (address,)).fetchone()
        return State(row[0]) if row else None


def make_db(path: str, n: int) -> list[str]:
    states = [s.value for s in State]
    addresses = [f"user{i}@example.org" for i in range(n)]
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, state TEXT NOT NULL)")
        db.executemany("INSERT INTO accounts VALUES (?, ?)", [(a, random.choice(states)) for a in addresses])
    return addresses


def pipelining_client(sock_path: str, keys_path: str, depth: int) -> int:
    """Send `depth` requests per write, read their replies, repeat; returns the number of replies."""
    import socket

    from sidecar.wire import netstring

    keys = Path(keys_path).read_text().split()
    dec = netstring.Decoder()
    got = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        for i in range(0, len(keys), depth):
            chunk = keys[i : i + depth]
            s.sendall(b"".join(netstring.encode(b"transport " + k.encode()) for k in chunk))
            want = got + len(chunk)
            while got < want:
                got += len(dec.feed(s.recv(65536)))
    return got


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--keys", type=int, default=20000, help="lookups per client")
    ap.add_argument("--cache-ttl", type=float, default=0.0)
    ap.add_argument("--pipeline", type=int, default=0, help="raw clients sending this many requests per write")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        addresses = make_db(f"{tmp}/state.db", 10_000)
        Path(f"{tmp}/pf").mkdir()
        Path(f"{tmp}/pf/main.cf").write_text("")
        for c in range(args.clients):
            keys = [random.choice(addresses) if i % 4 else f"new{c}-{i}@example.org" for i in range(args.keys)]
            Path(f"{tmp}/keys{c}").write_text("\n".join(keys) + "\n")
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        policy = RoutingPolicy(cfg, SqliteStateStore(f"{tmp}/state.db"))  # type: ignore[arg-type]
        sock = f"{tmp}/sm.sock"
        server = await start_socketmap_server(f"unix:{sock}", policy, cache_ttl=args.cache_ttl)
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if args.pipeline:
            loop = asyncio.get_running_loop()
            with concurrent.futures.ProcessPoolExecutor(args.clients) as pool:
                futs = [
                    loop.run_in_executor(pool, pipelining_client, sock, f"{tmp}/keys{c}", args.pipeline)
                    for c in range(args.clients)
                ]
                codes = [0 if await f == args.keys else 1 for f in futs]
        else:
            procs = [
                await asyncio.create_subprocess_exec(
                    "postmap",
                    "-c",
                    f"{tmp}/pf",
                    "-q",
                    "-",
                    f"socketmap:unix:{sock}:transport",
                    stdin=open(f"{tmp}/keys{c}", "rb"),  # noqa: SIM115
                    stdout=asyncio.subprocess.DEVNULL,
                )
                for c in range(args.clients)
            ]
            codes = [await p.wait() for p in procs]
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        user = cpu1.ru_utime - cpu0.ru_utime
        cpu = user + (cpu1.ru_stime - cpu0.ru_stime)
        server.close()
        await server.wait_closed()
        total = args.clients * args.keys
        assert server.stats.requests == total, (server.stats.requests, total)
        print(
            f"clients={args.clients} pipeline={args.pipeline} lookups={total} cache_ttl={args.cache_ttl} "
            f"cpus={os.cpu_count()} "
            f"elapsed={elapsed:.2f}s rate={total / elapsed:,.0f}/s exit={set(codes)} "
            f"cache_hits={server.stats.cache_hits} server_cpu={cpu:.2f}s "
            f"({cpu / total * 1e6:.1f} us/lookup, user {user / total * 1e6:.1f}: "
            f"one core serves {total / cpu:,.0f}/s)"
        )


if __name__ == "__main__":
    asyncio.run(main())

"""Socketmap throughput: real Postfix clients (`postmap -q -`, one connection each, one request at a time,
as Postfix's own daemons ask) against the sidecar's socketmap servers, side by side in one run.

    .venv/bin/python bench/socketmap_bench.py [--clients 8] [--keys 20000] [--workers 2] [--cache-ttl 0]
        [--servers asyncio,workers,null] [--rounds 1] [--pipeline 0]

Servers (each over the same store, each with the same clients and keys):
- `asyncio`: sidecar.edge.socketmap (the daemon's event loop plus one lookup thread; socketmap_workers = 0);
- `workers`: sidecar.edge.socketmap_worker, --workers forked processes (the default, socketmap_workers = 2);
- `null`: a do-nothing server in as many forked processes, answering every netstring with a constant `OK`
  without parsing or looking anything up: the ceiling the clients and the kernel allow on this machine.

The store is the real SqliteStore (WAL) with 10,000 accounts; a quarter of the keys are unknown addresses,
so about 1 lookup in 4 is a miss (RoutingPolicy then answers the relay route). Prints one line per server with
lookups/s, the server's CPU per lookup and the load average, then the ratios against `null`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import resource
import selectors
import signal
import socket
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar.auth.routing import RoutingPolicy
from sidecar.config import Config
from sidecar.edge.socketmap import start_socketmap_server
from sidecar.edge.socketmap_worker import start_socketmap_workers
from sidecar.states import State
from sidecar.store.sqlite import SqliteStore
from sidecar.wire import netstring

CLK = os.sysconf("SC_CLK_TCK")


def make_store(path: str, n: int) -> tuple[SqliteStore, list[str]]:
    store = SqliteStore(path, dovecot_group="")
    store.init()
    states = [s.value for s in State]
    addresses = [f"user{i}@example.org" for i in range(n)]
    now = time.time()
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO accounts (address, state, created_at, updated_at) VALUES (?, ?, ?, ?)",
            [(a, random.choice(states), now, now) for a in addresses],
        )
    return store, addresses


def null_server(sock: socket.socket) -> None:
    """The do-nothing server's loop (in a forked child): a constant reply per complete netstring."""
    reply = netstring.encode(b"OK lmtp:unix:private/dovecot-lmtp")
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    decoders: dict[socket.socket, netstring.Decoder] = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                decoders[conn] = netstring.Decoder()
                sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            data = conn.recv(65536)
            if not data:
                sel.unregister(conn)
                decoders.pop(conn)
                conn.close()
                continue
            n = len(decoders[conn].feed(data))
            if n:
                conn.sendall(reply * n)


def start_null(path: str, workers: int) -> list[int]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                null_server(sock)
            finally:
                os._exit(0)
        pids.append(pid)
    sock.close()
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (after the comm field)
    return total / CLK


def pipelining_client(sock_path: str, keys_path: str, depth: int) -> int:
    """Send `depth` requests per write, read their replies, repeat; returns the number of replies."""
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


async def drive(args: argparse.Namespace, tmp: str, sock: str) -> tuple[float, set[int]]:
    t0 = time.perf_counter()
    if args.pipeline:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(args.clients) as pool:
            futs = [
                loop.run_in_executor(pool, pipelining_client, sock, f"{tmp}/keys{c}", args.pipeline)
                for c in range(args.clients)
            ]
            codes = {0 if await f == args.keys else 1 for f in futs}
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
        codes = {await p.wait() for p in procs}
    return time.perf_counter() - t0, codes


async def run_one(kind: str, args: argparse.Namespace, tmp: str, policy: RoutingPolicy, r: int) -> dict[str, Any]:
    sock = f"{tmp}/sm-{kind}-{r}.sock"
    total = args.clients * args.keys
    load = os.getloadavg()[0]
    if kind == "null":
        pids = start_null(sock, args.workers)
        elapsed, codes = await drive(args, tmp, sock)
        cpu = cpu_of(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        requests = total
    elif kind == "workers":
        server = await start_socketmap_workers(f"unix:{sock}", policy, workers=args.workers, cache_ttl=args.cache_ttl)
        elapsed, codes = await drive(args, tmp, sock)
        cpu = cpu_of(server.pids)
        requests = server.stats.requests
        server.close()
        await server.wait_closed()
    else:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        aserver = await start_socketmap_server(f"unix:{sock}", policy, cache_ttl=args.cache_ttl)
        elapsed, codes = await drive(args, tmp, sock)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime  # includes this driver's own bit
        requests = aserver.stats.requests
        aserver.close()
        await aserver.wait_closed()
    assert requests == total, (kind, requests, total)
    return {
        "server": kind,
        "workers": args.workers if kind != "asyncio" else 1,
        "lookups": total,
        "elapsed_s": round(elapsed, 2),
        "rate": round(total / elapsed),
        "server_cpu_us_per_lookup": round(cpu / total * 1e6, 1),
        "load1_before": round(load, 2),
        "exit": sorted(codes),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--keys", type=int, default=20000, help="lookups per client")
    ap.add_argument("--workers", type=int, default=2, help="processes of the workers and null servers")
    ap.add_argument("--servers", default="asyncio,workers,null")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the servers (reversed every other round)")
    ap.add_argument("--cache-ttl", type=float, default=0.0)
    ap.add_argument("--pipeline", type=int, default=0, help="raw clients sending this many requests per write")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store, addresses = make_store(f"{tmp}/state.db", 10_000)
        Path(f"{tmp}/pf").mkdir()
        Path(f"{tmp}/pf/main.cf").write_text("")
        for c in range(args.clients):
            keys = [random.choice(addresses) if i % 4 else f"new{c}-{i}@example.org" for i in range(args.keys)]
            Path(f"{tmp}/keys{c}").write_text("\n".join(keys) + "\n")
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        policy = RoutingPolicy(cfg, store)
        kinds = args.servers.split(",")
        print(f"cpus={os.cpu_count()} clients={args.clients} keys/client={args.keys} cache_ttl={args.cache_ttl}")
        for r in range(args.rounds):
            results = [await run_one(k, args, tmp, policy, r) for k in (kinds if r % 2 == 0 else kinds[::-1])]
            for res in results:
                print(res, flush=True)
            rates = {res["server"]: res["rate"] for res in results}
            if "null" in rates:
                shown = (f"{k} {v:,}/s ({v / rates['null']:.2f} of null)" for k, v in rates.items())
                print(f"round {r}: " + "  ".join(shown))
        store.close()


if __name__ == "__main__":
    asyncio.run(main())

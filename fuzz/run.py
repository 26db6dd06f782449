"""Run one fuzz target on demand.

    python -m fuzz.run TARGET [--count 100000] [--seed 1] [--timeout 2] [--engine mutate|atheris]
    python -m fuzz.run all --count 100000
    python -m fuzz.run --list

Engines:
  mutate   (default, no extra dependency) a mutation fuzzer: each input is a seed (valid messages of the
           codec) or an earlier input, changed by 1-4 random edits (bit flips, inserted/deleted/duplicated
           ranges, splices, protocol tokens such as NUL, CRLF, ':', ',', '{N}', huge lengths) or, one time in
           ten, random bytes. Deterministic for a given --seed.
  atheris  coverage-guided (libFuzzer) when atheris is installed (`pip install atheris`); --count is
           libFuzzer's -runs.

Every input runs under an alarm of --timeout seconds: overrunning it is a hang. A target raising anything
(its codec's own error is caught inside the target) is a crash. Findings are written to
fuzz/findings/TARGET-N.bin and the exit code is 1. The summary line gives inputs, seconds, inputs per second,
the slowest input and the peak RSS, which must stay flat (the decoders refuse to buffer beyond their caps).
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from fuzz.seeds import SEEDS
from fuzz.targets import TARGETS, Target

FINDINGS = Path(__file__).resolve().parent / "findings"
TOKENS = [
    b"\0", b"\r\n", b"\r", b"\n", b":", b",", b" ", b"=", b"{", b"}", b"(", b")", b"[", b"]", b'"', b"\\",
    b"\xff", b"\xc3\xa9", b"0", b"00", b"99999", b"100001", b"4294967296", b"{0}\r\n", b"{300}\r\n",
    b"{99999999999}\r\n", b"* 1 FETCH (", b"BODY[] ", b"UID 1 ", b"a OK done\r\n", b"AUTH1\0", b"OK\0",
    b"pass=", b"TEMP", b"[legacy]\n", b"= nan\n", b"= 1e999\n", b"= [[[[[[", b'"\\u0000"', b"'''",
]  # fmt: skip
MAX_INPUT = 16_384


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and buf:  # delete a range
            end = min(len(buf), pos + rng.randint(1, 16))
            del buf[pos:end]
        elif op == 3 and buf:  # duplicate a range (repetition: many fields, nested lists, long lines)
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randint(1, 32)]
            buf[pos:pos] = piece * rng.randint(1, 64)
        elif op == 4:  # a protocol token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 5 and pool:  # splice with another input
            other = rng.choice(pool)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 6 and buf:  # overwrite a byte with an interesting one
            buf[rng.randrange(len(buf))] = rng.choice(b"\0\r\n:,{}()[]\" \\\xff0123456789")
        elif op == 7:  # change a number (lengths, sizes, UIDs)
            digits = [i for i, c in enumerate(buf) if 0x30 <= c <= 0x39]
            if digits:
                i = rng.choice(digits)
                buf[i : i + 1] = str(rng.choice([0, 1, 9, 10, 255, 256, 2047, 2048, 2049, 65536, 10**12])).encode()
    return bytes(buf[:MAX_INPUT])


def run_mutate(name: str, target: Target, count: int, seed: int, timeout: float) -> int:
    rng = random.Random(f"{seed}:{name}")  # noqa: S311  (reproducible test inputs, not secrets)
    seeds = SEEDS[name]
    pool: list[bytes] = list(seeds)
    signal.signal(signal.SIGALRM, _alarm)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    findings = 0
    stalls = 0  # an alarm that the same input does not trigger again: the machine, not the codec
    slowest = 0.0
    started = time.monotonic()
    for n in range(count):
        r = rng.random()
        if r < 0.1:
            data = rng.randbytes(rng.randint(0, 256))
        elif r < 0.2:
            data = rng.choice(seeds)
        else:
            data = mutate(rng, rng.choice(pool), pool)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            target(data)
        except Hang:
            if _confirm_hang(target, data, timeout):
                findings += _record(name, n, data, f"hang: more than {timeout} s, twice")
            else:
                stalls += 1
        except Exception:
            findings += _record(name, n, data, traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t0)
        if len(pool) < 512:
            pool.append(data)
        else:
            pool[rng.randrange(len(seeds), len(pool))] = data
    took = time.monotonic() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{name}: {count} inputs in {took:.1f} s ({count / took:.0f}/s), slowest {slowest * 1000:.1f} ms, "
        f"peak RSS {rss_before // 1024} -> {rss_after // 1024} MiB, {findings} finding(s)"
        + (f", {stalls} unconfirmed stall(s)" if stalls else ""),
        flush=True,
    )
    return findings


def _confirm_hang(target: Target, data: bytes, timeout: float) -> bool:
    """Run an input that overran its alarm once more: a real hang overruns again."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        target(data)
    except Hang:
        return True
    except Exception:
        return True  # it fails either way: report it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return False


def _record(name: str, n: int, data: bytes, why: str) -> int:
    FINDINGS.mkdir(exist_ok=True)
    path = FINDINGS / f"{name}-{n}.bin"
    path.write_bytes(data)
    print(f"{name}: input {n} ({len(data)} bytes, saved to {path}):\n{why}", file=sys.stderr, flush=True)
    return 1


def run_atheris(name: str, target: Target, count: int, timeout: float) -> int:
    import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # optional dependency

    atheris.instrument_all()
    corpus = FINDINGS.parent / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(SEEDS[name]):
        (corpus / f"seed-{i}").write_bytes(s)
    argv = [sys.argv[0], f"-runs={count}", f"-timeout={max(1, int(timeout))}", "-rss_limit_mb=2048",
            f"-max_len={MAX_INPUT}", str(corpus)]  # fmt: skip
    started = time.monotonic()
    atheris.Setup(argv, target)
    try:
        atheris.Fuzz()
    except SystemExit as e:  # libFuzzer exits when -runs is reached
        code = int(e.code or 0)
        print(f"{name}: atheris, {count} runs in {time.monotonic() - started:.1f} s, exit {code}", flush=True)
        return 0 if code == 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description="run a codec fuzz target")
    ap.add_argument("target", nargs="?", help=f"one of {', '.join(TARGETS)}, or 'all'")
    ap.add_argument("--count", type=int, default=100_000, help="inputs to run (default 100000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (mutate engine)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds one input may take (default 2)")
    ap.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    ap.add_argument("--list", action="store_true", help="list the targets")
    args = ap.parse_args(argv)
    if args.list or not args.target:
        print("\n".join(TARGETS))
        return 0
    names = list(TARGETS) if args.target == "all" else [args.target]
    for name in names:
        if name not in TARGETS:
            ap.error(f"unknown target {name!r} (--list)")
    findings = 0
    for name in names:
        if args.engine == "atheris":
            if len(names) > 1:
                ap.error("atheris runs one target per process")
            findings += run_atheris(name, TARGETS[name], args.count, args.timeout)
        else:
            findings += run_mutate(name, TARGETS[name], args.count, args.seed, args.timeout)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

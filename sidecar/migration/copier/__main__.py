"""`python -m sidecar.migration.copier`: copy one account in a process of its own (tests, benchmarks, manual runs).

    echo "$PASSWORD" | python -m sidecar.migration.copier --host 127.0.0.2 --imap-port 143 --pop3-port 110 \
        --user alice@example.test --home /var/vmail/example.test/alice [--mode initial|delta|append] \
        [--marks marks.json] [--progress]

The password is read from the first line of stdin (never argv, never a file). Watermarks live in memory, or in
the JSON file named by --marks (no secrets in it) so that a later run (delta, append) sees them. Prints the
CopyResult as JSON on stdout, with the process's peak RSS (VmHWM, bytes); --progress prints one line per
message to stderr ("progress <done> <total> <bytes>"). Exit 0 done, 75 temporary failure (EX_TEMPFAIL), 77
credentials refused (EX_NOPERM), 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from sidecar.legacy.imap import SourceAuthError, SourceError, SourceParams, SourceUnavailable
from sidecar.migration.copier.engine import CopyOptions, Progress, copy_account
from sidecar.migration.copier.maildir import MaildirLocked
from sidecar.store.base import FolderMark


class FileStore:
    """The store methods the copier needs; marks kept in memory and, with a path, in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.marks: dict[str, dict[str, FolderMark]] = {}
        if path is not None and path.exists():
            raw = json.loads(path.read_text())
            self.marks = {a: {f: FolderMark(**m) for f, m in d.items()} for a, d in raw.items()}

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {a: {f: dataclasses.asdict(m) for f, m in d.items()} for a, d in self.marks.items()}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def folder_marks(self, address: str) -> dict[str, FolderMark]:
        return dict(self.marks.get(address, {}))

    def set_folder_mark(self, address: str, mark: FolderMark) -> None:
        self.marks.setdefault(address, {})[mark.folder] = mark
        self._save()

    def clear_folder_marks(self, address: str, folder: str | None = None) -> None:
        if folder is None:
            self.marks.pop(address, None)
        else:
            self.marks.get(address, {}).pop(folder, None)
        self._save()

    def set_progress(
        self,
        address: str,
        *,
        total: int | None = None,
        copied: int | None = None,
        bytes_copied: int | None = None,
    ) -> None:
        return None


def peak_rss() -> int:
    """VmHWM of this process in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sidecar.migration.copier", description=__doc__.split("\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--imap-port", type=int, default=143)
    ap.add_argument("--pop3-port", type=int, default=0)
    ap.add_argument("--user", required=True, help="legacy login")
    ap.add_argument("--address", help="account address (default: --user)")
    ap.add_argument("--home", required=True, type=Path, help="the account's home on the target")
    ap.add_argument("--mode", choices=("initial", "delta", "append"), default="initial")
    ap.add_argument("--marks", type=Path, help="JSON file keeping the watermarks between runs")
    ap.add_argument("--owner", default="vmail", help="user owning the mailbox files, or 'none'")
    ap.add_argument("--batch", type=int, default=200, help="messages per commit")
    ap.add_argument("--connections", type=int, default=1, help="IMAP sessions, folders in parallel")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    password = sys.stdin.readline().rstrip("\r\n")
    params = SourceParams(
        host=args.host, user=args.user, password=password, imap_port=args.imap_port, pop3_port=args.pop3_port
    )
    owner: Any = None if args.owner == "none" else args.owner
    opts = CopyOptions(owner=owner, batch_messages=args.batch, connections=args.connections)

    def progress(p: Progress) -> None:
        print(f"progress {p.messages_done} {p.messages_total} {p.bytes_done}", file=sys.stderr, flush=True)

    try:
        result = copy_account(
            params,
            args.home,
            FileStore(args.marks),
            args.address or args.user,
            mode=args.mode,
            progress=progress if args.progress else None,
            options=opts,
        )
    except SourceAuthError as e:
        print(json.dumps({"error": type(e).__name__, "reason": str(e)}))
        return 77
    except (SourceUnavailable, MaildirLocked) as e:
        print(json.dumps({"error": type(e).__name__, "reason": str(e)}))
        return 75
    except SourceError as e:
        print(json.dumps({"error": type(e).__name__, "reason": str(e)}))
        return 1
    out = dataclasses.asdict(result)
    out["messages_copied"] = result.messages_copied
    out["bytes_copied"] = result.bytes_copied
    out["peak_rss"] = peak_rss()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A throwaway PostgreSQL cluster, from the Debian postgresql package alone.

    with PgCluster() as pg:             # new temporary directory, deleted afterwards
        url = pg.create_schema()        # a fresh schema (search_path in the URL): cheap
        url = pg.create_database()      # or a fresh database: dearer

    cluster = PgCluster(Path("/tmp/lab/pg"))   # a lab's cluster in a directory it keeps
    cluster.start(); cluster.pid; cluster.stop()

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/pgcluster.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from sidecar.lab.proc import free_port, pid_alive

PG_BIN = Path(os.environ.get("AUTOPORT_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
SUPERUSER = "postgres"

_SETTINGS = """
# autoport test cluster
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
logging_collector = off
"""


class PgClusterError(Exception):
    pass


class PgCluster:
    def __init__(self, directory: Path | None = None) -> None:
        self._temporary = directory is None
        self.dir: Path | None = directory

    # --- paths --------------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise PgClusterError("the cluster has no directory (not set up, or torn down)")
        return self.dir / name

    @property
    def data(self) -> Path:
        return self._path("data")

    @property
    def sockets(self) -> Path:
        return self._path("sockets")

    @property
    def log(self) -> Path:
        return self._path("postgres.log")

    @property
    def port(self) -> int:
        return int(self._path("port").read_text())

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (from this cluster's own postmaster.pid), None when it is not running."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            if pid_alive(pid):
                return pid
        return None

    @property
    def running(self) -> bool:
        return self.dir is not None and self.pid is not None

    def url(self, dbname: str = "postgres", user: str = SUPERUSER, schema: str = "") -> str:
        options = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}{options}"

    # --- lifecycle ----------------------------------------------------------------------------------------
    def _pg(self, program: str, *args: str, timeout: float = 90) -> str:
        """Run a PostgreSQL program as the postgres OS user."""
        p = subprocess.run(
            ["runuser", "-u", OS_USER, "--", str(PG_BIN / program), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"},
        )
        if p.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self.log.read_text()[-2000:]
            raise PgClusterError(f"{program} failed ({p.returncode}): {p.stderr or p.stdout}\n{tail}")
        return p.stdout

    def _initdb(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise PgClusterError(f"no initdb in {PG_BIN}: install the postgresql package (make install)")
        pw = pwd.getpwnam(OS_USER)
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        for d in (self.dir, self.sockets):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        self._pg(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        port = free_port()
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(_SETTINGS.format(port=port, sockets=self.sockets))
        self._path("port").write_text(f"{port}\n")

    def start(self) -> None:
        """initdb when the directory has no cluster yet, then start it (no-op when running)."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="autoport-pg-"))
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        if not self.running:
            self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if self.dir is None or self.pid is None:
            return
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        except PgClusterError:
            pid = self.pid  # last resort: the postmaster named in OUR data directory's pid file
            if pid is not None:
                os.kill(pid, 9)
                time.sleep(0.5)

    def setup(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Stop; delete the directory when it is our temporary one."""
        if self.dir is None:
            return
        self.stop()
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PgCluster:
        return self.setup()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    # --- databases, schemas, roles ------------------------------------------------------------------------
    def execute(
        self, sql: str, params: tuple[Any, ...] = (), *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); its rows, if it returns any."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def create_database(self, name: str = "") -> str:
        """A fresh, empty database (reused when it exists); its URL."""
        name = name or "t_" + uuid.uuid4().hex[:12]
        if not self.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
            # FILE_COPY: several times faster than the WAL_LOG default (fsync is off anyway)
            self.execute(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def create_schema(self, name: str = "", dbname: str = "postgres") -> str:
        """A fresh schema; the URL returned puts only it on the search_path."""
        name = name or "t_" + uuid.uuid4().hex[:12]
        self.execute(f'CREATE SCHEMA "{name}"', dbname=dbname)
        return self.url(dbname, schema=name)

    def drop_schema(self, name: str, dbname: str = "postgres") -> None:
        self.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', dbname=dbname)

    def create_role(self, name: str) -> None:
        """A login role (idempotent: roles are cluster-wide)."""
        if not self.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)):
            self.execute(f'CREATE ROLE "{name}" LOGIN')

"""A throwaway PostgreSQL server on loopback, for tests of the distributed search (issue #17).

``postgres_server()`` runs ``initdb`` in a temporary directory, starts ``postgres`` on 127.0.0.1 on a
free port with trust authentication and no Unix socket, and on exit stops it and removes the
directory. Databases are made per test with ``PostgresServer.create_database``; ``url`` gives an
SQLAlchemy URL (driver psycopg 3) that ``optuna.storages.RDBStorage`` accepts.

The binaries come from Debian's ``postgresql`` package (``scripts/ci_postgres.sh`` installs it):
``postgres`` and ``initdb`` on PATH, else the newest ``/usr/lib/postgresql/<version>/bin``.
initdb refuses to run as root, so as root the server runs as the ``postgres`` user (``nobody``
when there is none). When no server can be had, ``PostgresUnavailable`` says why.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

SUPERUSER = "postgres"  # the database role initdb creates; trust auth, so no password
HOST = "127.0.0.1"
_DEBIAN_BIN_DIRS = "/usr/lib/postgresql"
_PORT_ATTEMPTS = 3  # a free port can be taken by another process between our probe and postgres' bind


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why and what to install."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens and how to reach it."""

    port: int
    data_dir: Path
    bin_dir: Path

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database``, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5433/db_1``.

        The driver is named: SQLAlchemy 2.0 reads a bare ``postgresql://`` as psycopg2."""
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless ``name`` is given) and return its name."""
        name = name or f"db_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing the connections still open on it (a worker's pool, say)."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        # CREATE/DROP DATABASE cannot run inside a transaction block.
        with psycopg.connect(_conninfo(self.port), autocommit=True) as conn:
            conn.execute(sql)


def find_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``postgres``; ``PostgresUnavailable`` if there is none."""
    on_path = shutil.which("postgres")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    # Debian keeps the server binaries off PATH, one directory per major version: newest first.
    debian = sorted(Path(_DEBIAN_BIN_DIRS).glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True)
    for bin_dir in candidates + debian:
        if (bin_dir / "initdb").is_file() and (bin_dir / "postgres").is_file():
            return bin_dir
    raise PostgresUnavailable(
        f"no PostgreSQL server binaries (initdb, postgres) on PATH or under {_DEBIAN_BIN_DIRS}/*/bin: "
        "run scripts/ci_postgres.sh (apt-get install postgresql)"
    )


@contextmanager
def postgres_server(start_timeout_s: float = 30.0) -> Iterator[PostgresServer]:
    """Start a throwaway server, yield it, then stop it and delete its files (also when the body raises).

    Durability is off (fsync, synchronous_commit, full_page_writes): the data dies with the test.
    """
    try:
        import psycopg  # noqa: F401  (checked first: without the driver the server is of no use)
    except ImportError as e:
        raise PostgresUnavailable(f"the PostgreSQL driver is missing ({e}): pip install 'psycopg[binary]>=3.1'") from e
    bin_dir = find_bin_dir()
    run_as = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="darwin-hydra-pg-"))
    proc: subprocess.Popen | None = None
    try:
        if run_as is not None:
            os.chown(root, run_as.pw_uid, run_as.pw_gid)
        data_dir = root / "data"
        _initdb(bin_dir, data_dir, run_as)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _free_port()
            proc = _start(bin_dir, data_dir, port, root / "server.log", run_as)
            if _wait_ready(proc, port, root / "server.log", start_timeout_s, last_attempt=attempt == _PORT_ATTEMPTS):
                break
            proc = None  # it exited on a port taken meanwhile: try another
        server = PostgresServer(port=port, data_dir=data_dir, bin_dir=bin_dir)
        log.info("PostgreSQL %s started on %s:%d (data in %s)", bin_dir.parent.name, HOST, port, data_dir)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (initdb and postgres refuse root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' user exists to run initdb as")


def _as_user(run_as: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run the child as ``run_as`` (nothing when we are not root)."""
    if run_as is None:
        return {}
    return {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": [], "env": _server_env(run_as)}


def _server_env(run_as: pwd.struct_passwd) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": run_as.pw_dir, "LC_ALL": "C", "TZ": "UTC"}


def _initdb(bin_dir: Path, data_dir: Path, run_as: pwd.struct_passwd | None) -> None:
    cmd = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust",
           "--encoding=UTF8", "--locale=C", "--no-sync"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=data_dir.parent, **_as_user(run_as))
    if done.returncode != 0:
        raise PostgresUnavailable(f"initdb failed (exit {done.returncode}) for {data_dir}:\n{done.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start(
    bin_dir: Path, data_dir: Path, port: int, log_path: Path, run_as: pwd.struct_passwd | None
) -> subprocess.Popen:
    cmd = [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", HOST, "-p", str(port),
           "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
           "-c", "full_page_writes=off"]  # fmt: skip
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
            start_new_session=True,  # Ctrl-C reaches pytest, which then stops the server in order
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            **_as_user(run_as),
        )


def _die_with_parent() -> None:
    """In the child: have the kernel send SIGQUIT (immediate shutdown) when the test process dies,
    so a pytest killed by a timeout or SIGKILL leaves no server behind. Runs after the uid change,
    which would otherwise clear the setting."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGQUIT), 0, 0, 0)


def _wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float, last_attempt: bool) -> bool:
    """True once the server accepts connections; False if it exited because the port was taken."""
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")
            if "could not bind" in text and not last_attempt:
                return False
            raise PostgresUnavailable(f"postgres exited with code {proc.returncode}; {log_path}:\n{text[-2000:]}")
        try:
            with psycopg.connect(_conninfo(port), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                _stop(proc)
                raise PostgresUnavailable(f"postgres did not accept connections on port {port} in {timeout_s:.0f} s")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: open sessions are cut, then the server exits); immediate, then kill, if it hangs."""
    for sig, wait_s in ((signal.SIGINT, 10.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("postgres (pid %d) still running %.0f s after %s", proc.pid, wait_s, sig.name)


def _conninfo(port: int, database: str = "postgres") -> str:
    return f"host={HOST} port={port} user={SUPERUSER} dbname={database}"

"""The worklist's state: one SQLite file, safe for several viewers and crashes.

Every change is one short transaction opened with ``BEGIN IMMEDIATE`` (the
write lock is taken before anything is read, so a read-modify-write by one
process can never be based on a value another process is changing), and
counters are added in SQL (``edits = edits + ?``), so two processes never lose
each other's status, time or edit counts. A process killed inside a
transaction leaves the database as it was before that transaction: SQLite's
journal rolls it back when the next connection opens the file.

Journal mode: WAL where the filesystem supports it (readers never wait for a
writer); the rollback journal (``DELETE``) on network filesystems (NFS, SMB /
CIFS, sshfs, 9p...), where WAL's shared-memory index does not work across
machines, and whenever switching to WAL fails. ``NAPARI_MEDSEG_WORKLIST_JOURNAL``
(``wal`` or ``delete``) overrides the choice.

Only the stdlib :mod:`sqlite3` is used; nothing here imports napari or Qt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
from pathlib import Path

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = ["STATUSES", "Store", "journal_mode_for", "is_network_fs"]

#: Case statuses, in workflow order.
STATUSES = ("new", "predicted", "in progress", "needs review", "approved")
SCHEMA_VERSION = 1
JOURNAL_ENV = "NAPARI_MEDSEG_WORKLIST_JOURNAL"
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smbfs", "smb2", "smb3", "9p", "afs",
               "fuse.sshfs", "sshfs", "ncpfs", "davfs", "fuse.davfs2", "glusterfs",
               "fuse.glusterfs", "ceph", "lustre", "gpfs", "beegfs", "fuse.s3fs",
               "fuse.rclone", "virtiofs", "vboxsf", "drvfs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS cases (
    case_id     TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    paths       TEXT NOT NULL,
    reference   TEXT,
    status      TEXT NOT NULL DEFAULT 'new' CHECK (status IN ({statuses})),
    annotator   TEXT,
    reviewer    TEXT,
    seconds     REAL NOT NULL DEFAULT 0,
    edits       INTEGER NOT NULL DEFAULT 0,
    uncertainty REAL,
    model       TEXT,
    training_case TEXT,
    note        TEXT,
    updated     REAL
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL,
    time    REAL NOT NULL,
    who     TEXT,
    action  TEXT NOT NULL,
    old     TEXT,
    new     TEXT,
    host    TEXT,
    pid     INTEGER
);
""".format(statuses=", ".join(f"'{s}'" for s in STATUSES))


def is_network_fs(path) -> bool:
    """True when ``path`` lies on a network filesystem (Linux mounts, Windows UNC).

    Parameters
    ----------
    path : str or Path
        An existing folder or file.
    """
    p = os.path.abspath(str(path))
    if os.name == "nt":
        return p.startswith("\\\\")
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2].lower()
    except OSError:  # not Linux: macOS has no /proc; assume local
        return False
    return fstype in _NETWORK_FS or fstype.startswith(("nfs", "cifs", "smb"))


def journal_mode_for(folder) -> str:
    """``"wal"`` or ``"delete"``: the journal mode to ask for in ``folder``."""
    env = os.environ.get(JOURNAL_ENV, "").strip().lower()
    if env in ("wal", "delete"):
        return env
    return "delete" if is_network_fs(folder) else "wal"


class Store:
    """The worklist database (one SQLite file).

    Parameters
    ----------
    path : Path
        The database file (created with its schema when missing).
    journal : {"auto", "wal", "delete"}
        ``"auto"``: :func:`journal_mode_for` the file's folder. When WAL cannot
        be switched on, the rollback journal is used.
    timeout : float
        Seconds to wait for another process's write lock.

    Attributes
    ----------
    journal_mode : str
        The mode in effect (``"wal"`` or ``"delete"``).
    """

    def __init__(self, path, journal: str = "auto", timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = float(timeout)
        want = journal_mode_for(self.path.parent) if journal == "auto" else journal
        self._conn = self._connect()
        self.journal_mode = self._set_journal(want)
        with self.transaction() as cur:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    cur.execute(stmt)
            cur.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = %d" % int(self.timeout * 1000))
            conn.execute("PRAGMA foreign_keys = ON")
            return conn
        except sqlite3.Error as exc:
            raise MedSegError(f"cannot open the worklist database ({exc}); check that the "
                              "folder is readable", str(self.path)) from exc

    def _set_journal(self, want: str) -> str:
        """Switch to ``want``; fall back to the rollback journal when WAL fails."""
        if want == "wal":
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower()
            except sqlite3.OperationalError as exc:
                log.warning("%s: WAL journal not available (%s); using the rollback journal",
                            self.path, exc)
                mode = ""
            if mode == "wal":
                self._conn.execute("PRAGMA synchronous = NORMAL")
                return "wal"
        try:
            mode = self._conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0].lower()
        except sqlite3.OperationalError as exc:
            raise MedSegError(f"cannot use the worklist database ({exc}); choose a folder "
                              "on a writable disk", str(self.path)) from exc
        self._conn.execute("PRAGMA synchronous = FULL")
        return mode

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction (``BEGIN IMMEDIATE``): all of it or nothing.

        Yields a cursor; commits on success, rolls back on any exception.
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise MedSegError(f"the worklist database is busy or read-only ({exc}); try "
                              "again", str(self.path)) from exc
        try:
            yield conn.cursor()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def query(self, sql: str, args=()) -> list:
        """Rows of a read-only statement (a consistent snapshot)."""
        return self._conn.execute(sql, args).fetchall()

    # ----------------------------------------------------------------- meta
    def get_meta(self, key: str, default=None):
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value, only_if_unset: bool = False):
        """Set ``key`` (JSON); with ``only_if_unset`` keep an existing value. Returns the value."""
        with self.transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None and only_if_unset:
                return json.loads(row[0])
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        return value

    # ---------------------------------------------------------------- events
    @staticmethod
    def log_event(cur, case_id: str, action: str, who=None, old=None, new=None) -> None:
        cur.execute("INSERT INTO events (case_id, time, who, action, old, new, host, pid) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (case_id, time.time(), who, action,
                     None if old is None else str(old), None if new is None else str(new),
                     socket.gethostname(), os.getpid()))

    def integrity_ok(self) -> bool:
        """``PRAGMA integrity_check`` says ok."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

"""The sha256 checks this machine has already done on artifact files, so that a load need not hash an unchanged
file again.

The rule: after a file's sha256 matched its manifest, the check is recorded (in the cache folder, see
:func:`framegraph.runtime.cache.cache_root`, one record per artifact folder) with the file's size, mtime, ctime,
inode and device at that time. A later check of the same file against the same sha256 is skipped while all five are
unchanged. Anything that writes the file, copies or moves another file over it, or touches it changes its ctime
(which no system call lets a user set back), so such a file is hashed again. What the record cannot see is a change
below the file system (a raw write to the device, bit rot); ``verify="full"`` hashes every file on every load.

The record is an optimisation only: one that cannot be read or written is ignored (the files are then hashed as
before), and it never turns a failed check into a passed one. A record whose artifact folder no longer exists is
deleted when another record is written, so records do not pile up as artifacts are removed.
"""

import hashlib
import json
import logging
import os
import tempfile

from .cache import cache_root, hex_name

logger = logging.getLogger(__name__)

SCHEMA = 1


def file_stamp(path):
    """(size, mtime_ns, ctime_ns, inode, device) of ``path``: what changes when the file is written or replaced."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashRecord:
    """The recorded sha256 checks of the files of the artifact folder ``folder``."""

    def __init__(self, folder, root=None):
        self.folder = os.path.realpath(folder)
        key = hashlib.sha256(self.folder.encode()).hexdigest()[:24]
        self.path = (root or cache_root()) / "verified" / f"{key}.json"
        self._files = self._read()
        self._changed = False

    def _read(self):
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.debug("ignoring the hash record %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("folder") != self.folder:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def checked(self, relpath, full, sha256):
        """Whether the file ``full`` (``relpath`` in the folder) was found to have ``sha256`` by an earlier check and
        is unchanged since."""
        entry = self._files.get(relpath)
        return (isinstance(entry, dict) and entry.get("sha256") == sha256
                and entry.get("stamp") == file_stamp(full))

    def add(self, relpath, stamp, sha256):
        """Record that the file ``relpath``, with ``stamp`` (its :func:`file_stamp` taken before it was hashed),
        has ``sha256``."""
        self._files[relpath] = {"sha256": sha256, "stamp": stamp}
        self._changed = True

    def save(self):
        """Write the record (atomically) if it gained checks; a record that cannot be written is left out."""
        if not self._changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": SCHEMA, "folder": self.folder, "files": self._files}, f)
            os.replace(tmp, self.path)
            self._changed = False
        except OSError as exc:
            logger.debug("could not write the hash record %s: %s", self.path, exc)
            return
        prune(self.path.parent)


def prune(records):
    """Delete the records in the folder ``records`` whose artifact folder no longer exists. Only files this module
    writes (``<24 hex digits>.json`` holding this schema and a folder) are touched."""
    for path in records.glob("*.json"):
        stem = path.stem
        if not hex_name(stem, 24):
            continue
        try:
            data = json.loads(path.read_text())
            if (isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("folder"), str)
                    and not os.path.isdir(data["folder"])):
                path.unlink()
        except (OSError, ValueError):
            continue

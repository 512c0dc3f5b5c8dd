"""Safe artifact writes: build in a hidden staging folder, write the manifest last, rename into place.

A killed or failed export leaves only ``.NAME.partial-*`` (no manifest), never a folder that looks complete.
An existing ``--out`` is replaced only when it is empty, or when it is a framegraph artifact (its manifest loads) and
the user passed ``--overwrite``; anything else is refused before the export starts and again before the commit, and
left untouched. Re-running with identical options and ``--overwrite`` reuses the previous artifact's component graphs
whose files still match their manifest hashes.
"""

import logging
import os
import shutil
from pathlib import Path

from framegraph.runtime.manifest import MANIFEST_NAME, ArtifactError, Manifest, file_entry, verify_files

logger = logging.getLogger(__name__)


def check_output_folder(out, overwrite=False):
    """Refuse an ``--out`` that an export may not write: a file, a path under a file, a folder that is neither empty
    nor a framegraph artifact (a ``manifest.json`` that :meth:`Manifest.load` rejects counts as foreign), or a
    framegraph artifact without ``overwrite``. Returns ``"new"``, ``"empty"`` or ``"artifact"`` (what is at ``out``
    now); raises FileExistsError, whose message says what to do, and touches nothing."""
    out = Path(out).resolve()
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; choose another --out (the export writes a "
                              "folder and never replaces a file)")
    if not any(out.iterdir()):
        return "empty"
    try:
        Manifest.load(out)
    except ArtifactError as exc:
        logger.debug("%s is not a framegraph artifact: %s", out, exc)
        why = ("its manifest.json is not a framegraph manifest this version reads" if (out / MANIFEST_NAME).exists()
               else "it is not empty and has no manifest.json")
        raise FileExistsError(
            f"--out {out} exists and is not a framegraph artifact ({why}); the export replaces only artifacts it "
            "wrote: choose another --out, or empty the folder yourself"
        ) from None
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds a framegraph artifact; pass --overwrite to replace it "
                              "(graphs that still match are reused) or choose another --out")
    return "artifact"


class ArtifactWriter:
    """Stages an export next to ``out`` and moves it into place on :meth:`commit`; ``out`` must pass
    :func:`check_output_folder` with ``overwrite`` when the writer is made and again when it commits."""

    def __init__(self, out, fingerprint, overwrite=False):
        self.out = Path(out).resolve()
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        check_output_folder(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._clean_stale_stages()
        self.stage = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()
        self.previous = self._previous_manifest()

    def _clean_stale_stages(self):
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                logger.info("removing %s left by an interrupted export", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def _previous_manifest(self):
        if not (self.out / "manifest.json").is_file():
            return None
        try:
            manifest = Manifest.load(self.out)
        except ArtifactError as exc:
            logger.info("not reusing %s: %s", self.out, exc)
            return None
        if manifest.options.get("fingerprint") != self.fingerprint:
            return None
        return manifest

    def reuse_component(self, name, keys, require_checked=False):
        """Copy the previous artifact's graphs of component ``name`` if it holds exactly ``keys`` and they verify
        (and, with ``require_checked``, were checked at export)."""
        if self.previous is None:
            return None
        entries = [g for g in self.previous.graphs if g.name == name]
        if sorted(g.key for g in entries) != sorted(keys):
            return None
        if require_checked and any(g.max_abs_error is None for g in entries):
            logger.info("re-exporting %s: the previous export was not checked", name)
            return None
        files = {f.path: f for g in entries for f in g.files}
        try:
            verify_files(self.out, files.values())
        except ArtifactError as exc:
            logger.info("re-exporting %s: %s", name, exc)
            return None
        for rel in files:
            target = self.stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(self.out / rel, target)
        logger.info("reused %d %s graph(s) from %s", len(entries), name, self.out)
        return entries

    def unstage(self, entries):
        """Take the files of reused graph ``entries`` out of the staging folder again (links to the previous
        artifact's files: only the links go)."""
        for rel in {f.path for g in entries for f in g.files}:
            (self.stage / rel).unlink(missing_ok=True)

    def path(self, rel):
        return stage_path(self.stage, rel)

    def entry(self, full_path):
        return file_entry(self.stage, full_path.relative_to(self.stage).as_posix())

    def commit(self, manifest):
        """Write the manifest and move the staging folder into place. What is at ``out`` now is checked again (it
        may have changed during a long export): only an empty folder or, with ``overwrite``, a framegraph artifact
        is replaced; anything else raises FileExistsError and stays as it is. The files are hashed once more in
        place, which records their checks for the loads on this machine."""
        manifest.options["fingerprint"] = self.fingerprint
        manifest.save(self.stage)
        found = check_output_folder(self.out, self.overwrite)
        old = None
        if found != "new":
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.stage.rename(self.out)
        if found == "empty":
            try:
                old.rmdir()  # never rmtree: a file that appeared since the check stays
            except OSError as exc:
                logger.warning("kept %s: it was empty when checked but no longer is (%s)", old, exc)
        elif found == "artifact":
            try:
                Manifest.load(old)  # still an artifact after the move: only then is it deleted
            except ArtifactError as exc:
                logger.warning("kept the previous --out as %s: it no longer loads as an artifact (%s)", old, exc)
            else:
                shutil.rmtree(old, ignore_errors=True)
        # hash the files where they now lie: this proves them and records the checks on this machine, so that the
        # first load need not hash them again (see runtime/hash_record.py)
        verify_files(self.out, manifest.all_files())
        logger.info("artifact written to %s", self.out)
        return self.out

    def abort(self):
        shutil.rmtree(self.stage, ignore_errors=True)


def stage_path(stage, rel):
    """``stage / rel``, with its folder created."""
    full = Path(stage) / rel
    full.parent.mkdir(parents=True, exist_ok=True)
    return full


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

"""Safe artifact writes: build in a hidden staging folder, write the manifest last, rename into place.

A killed or failed export leaves only ``.NAME.partial-*`` (no manifest), never a folder that looks complete.
Re-running with identical options reuses the previous artifact's component graphs whose files still match their
manifest hashes.
"""

import logging
import os
import shutil
from pathlib import Path

from framegraph.runtime.manifest import ArtifactError, Manifest, file_entry, verify_files

logger = logging.getLogger(__name__)


class ArtifactWriter:
    def __init__(self, out, fingerprint):
        self.out = Path(out).resolve()
        self.fingerprint = fingerprint
        if self.out.exists() and not (self.out / "manifest.json").is_file() and any(self.out.iterdir()):
            raise FileExistsError(
                f"{self.out} exists and is not a framegraph artifact; choose another --out or empty it first"
            )
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

    def path(self, rel):
        return stage_path(self.stage, rel)

    def entry(self, full_path):
        return file_entry(self.stage, full_path.relative_to(self.stage).as_posix())

    def commit(self, manifest):
        """Write the manifest and move the staging folder into place (replacing any previous artifact)."""
        manifest.options["fingerprint"] = self.fingerprint
        manifest.save(self.stage)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.stage.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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

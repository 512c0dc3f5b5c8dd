"""The artifact manifest (``manifest.json``): what an exported folder holds and how to call each graph.

Standard library only: the exporter writes it, the runtime reads it, neither needs the other. One entry per
compiled graph (name, format, bucket), with its files and hashes, ordered inputs/outputs, and the error measured
against the MindSpore model at export time.
"""

import dataclasses
import hashlib
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from .hash_record import HashRecord, file_stamp

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "mindir", "mslite")  # ONNX, MindSpore MindIR, MindSpore Lite (.ms, converted from the ONNX)
DEFAULT_FORMATS = ("onnx", "mindir")


class ArtifactError(ValueError):
    """The artifact folder is missing, corrupt, foreign or was built for something else."""


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list

    @classmethod
    def from_dict(cls, d):
        return cls(name=d["name"], dtype=d["dtype"], shape=[int(s) for s in d["shape"]])


@dataclasses.dataclass
class FileEntry:
    """One file of the artifact: ``path`` relative to the artifact folder (see :func:`check_relative_path`)."""

    path: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d, source="manifest", owner="the artifact"):
        """The entry ``d`` of ``owner`` (a graph key, or "the artifact" for its other files) in the manifest
        ``source``; its path is refused unless it names a file inside the artifact folder."""
        return cls(path=check_relative_path(d["path"], source, owner), sha256=d["sha256"], size=int(d["size"]))


@dataclasses.dataclass
class GraphEntry:
    """One compiled graph: ``name`` (diffusers' component name), ``format``, ``bucket`` (e.g. num_frames, batch)."""

    name: str
    format: str
    bucket: dict
    files: list
    inputs: list
    outputs: list
    max_abs_error: float = None
    tolerance: float = None
    checked_on: dict = None  # the bucket the check ran where it is not ``bucket`` (a probe: export/probe_check.py)

    @property
    def key(self):
        return graph_key(self.name, self.format, self.bucket)

    @property
    def main_file(self):
        """The graph file the backend opens: the first of ``files`` (the others are its weights)."""
        if not self.files:
            raise ArtifactError(f"graph {self.key} lists no files, so there is no graph file to open; re-export the "
                                "artifact (svd-export)")
        return self.files[0].path

    @classmethod
    def from_dict(cls, d, source="manifest"):
        """The graph entry ``d`` of the manifest ``source``; refused unless it lists at least its graph file and
        every file path stays inside the artifact folder."""
        key = graph_key(d["name"], d["format"], d["bucket"])
        if not d["files"]:
            raise ArtifactError(
                f"{source}: graph {key} lists no files (\"files\": []), so there is no graph file to open; "
                "re-export the artifact (svd-export) or restore its original manifest.json"
            )
        return cls(
            name=d["name"],
            format=d["format"],
            bucket=dict(d["bucket"]),
            files=[FileEntry.from_dict(f, source, f"graph {key}") for f in d["files"]],
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
            max_abs_error=d.get("max_abs_error"),
            tolerance=d.get("tolerance"),
            checked_on=d.get("checked_on"),
        )


def graph_key(name, fmt, bucket):
    return f"{name}/{fmt}/" + ",".join(f"{k}={bucket[k]}" for k in sorted(bucket))


@dataclasses.dataclass
class Manifest:
    pipeline: str
    source: dict
    toolchain: dict
    constants: dict
    scheduler: dict
    defaults: dict
    dtype: str = "float32"
    graphs: list = dataclasses.field(default_factory=list)
    files: list = dataclasses.field(default_factory=list)  # other files (tokenizer, preprocessor, scheduler)
    options: dict = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- reading / writing -------------------------------------------------------------------------------------
    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, folder):
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=False)
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d, source="manifest"):
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{source}: schema_version {version!r} is not supported by this framegraph (it reads "
                f"{SCHEMA_VERSION}); re-export the artifact with this version (svd-export) or install the framegraph "
                "version that wrote it."
            )
        try:
            return cls(
                pipeline=d["pipeline"],
                source=d["source"],
                toolchain=d["toolchain"],
                constants=d["constants"],
                scheduler=d["scheduler"],
                defaults=d["defaults"],
                dtype=d.get("dtype", "float32"),
                graphs=[GraphEntry.from_dict(g, source) for g in d["graphs"]],
                files=[FileEntry.from_dict(f, source) for f in d.get("files", [])],
                options=d.get("options", {}),
                schema_version=version,
            )
        except ArtifactError:  # already says which entry and what to do
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{source} is malformed ({type(exc).__name__}: {exc}); re-export the artifact") from exc

    @classmethod
    def load(cls, folder):
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(
                f"{path} not found: {folder} is not a framegraph artifact folder (or its export did not finish). "
                "Create one with svd-export MODEL --out DIR."
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} is not a framegraph manifest; re-export the artifact")
        return cls.from_dict(data, source=str(path))

    # -- queries -----------------------------------------------------------------------------------------------
    def find(self, name, fmt, **bucket):
        """The graph ``name`` in ``fmt`` whose bucket has the given values; a clear error lists what exists."""
        matches = [
            g for g in self.graphs
            if g.name == name and g.format == fmt and all(g.bucket.get(k) == v for k, v in bucket.items())
        ]
        if not matches:
            have = sorted(g.key for g in self.graphs if g.name == name and g.format == fmt)
            raise ArtifactError(
                f"no {fmt} graph {name!r} for {bucket}; this artifact has: {', '.join(have) or 'none'}"
            )
        return matches[0]

    def bucket_values(self, name, fmt, key):
        return sorted({g.bucket[key] for g in self.graphs if g.name == name and g.format == fmt and key in g.bucket})

    def formats(self):
        return sorted({g.format for g in self.graphs})

    def all_files(self):
        seen = {}
        for g in self.graphs:
            for f in g.files:
                seen[f.path] = f
        for f in self.files:
            seen[f.path] = f
        return list(seen.values())


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_relative_path(path, source="manifest", owner="the artifact"):
    """``path`` (a manifest file path) as given, or ArtifactError naming ``source`` and ``owner``.

    The rule: a manifest names files inside its artifact folder only, by a relative path without ``..``
    components, read as a POSIX and as a Windows path (so neither ``/etc/x``, ``C:/x`` nor ``..\\x`` passes).
    Symlinks are caught where the path is opened, by :func:`resolve_in_folder`.
    """
    if not isinstance(path, str) or path in ("", "."):
        raise ArtifactError(
            f"{source}: file {path!r} of {owner} is not a file path inside the artifact folder; re-export the "
            "artifact (svd-export) or restore its original manifest.json"
        )
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        problem = "is an absolute path"
    elif ".." in posix.parts or ".." in windows.parts:
        problem = "has a '..' component"
    else:
        return path
    raise ArtifactError(
        f"{source}: file {path!r} of {owner} {problem}, but a manifest may only name files inside its artifact "
        "folder (this one was edited, or is not a framegraph manifest); re-export the artifact (svd-export) or "
        "restore its original manifest.json"
    )


def resolve_in_folder(folder, path):
    """``folder / path`` for a manifest file ``path``, or ArtifactError unless it stays inside ``folder``.

    The one check every reader of a manifest file path goes through (hashing, verifying, opening a graph): the path
    must pass :func:`check_relative_path`, and once symlinks are resolved it must still lie under the resolved
    folder (a symlink inside the artifact pointing out of it is refused). The returned path is not resolved.
    """
    folder = Path(folder)
    full = folder / check_relative_path(path, str(folder / MANIFEST_NAME))
    root, target = folder.resolve(), full.resolve()
    if not target.is_relative_to(root):
        raise ArtifactError(
            f"{full} resolves to {target}, outside the artifact folder {root} (a symlink leads out of it); a manifest "
            "may only name files inside its artifact folder. Replace the link with the file itself (copy the whole "
            "artifact folder without links) or re-export the artifact (svd-export)"
        )
    return full


def file_entry(folder, path):
    """A FileEntry for ``folder/path`` (path relative to the artifact folder, and inside it)."""
    full = resolve_in_folder(folder, str(path))
    return FileEntry(path=str(path), sha256=sha256_file(full), size=full.stat().st_size)


VERIFY_MODES = (True, False, "full")


def verify_file(folder, entry, check_hash=True, record=None):
    """Raise ArtifactError unless ``entry`` is a file inside ``folder`` with the manifest's size (and sha256).

    With a ``record`` (HashRecord of ``folder``) a file it shows as already checked and unchanged is not hashed
    again, and a file that passes is added to it (see hash_record for the rule)."""
    full = resolve_in_folder(folder, entry.path)
    if not full.is_file():
        raise ArtifactError(f"{full} is missing from the artifact; re-export it (svd-export) or copy the whole folder")
    size = full.stat().st_size
    if size != entry.size:
        raise ArtifactError(
            f"{full} is {size} bytes but the manifest says {entry.size} (truncated or replaced); re-export or "
            "re-copy it"
        )
    if not check_hash or (record is not None and record.checked(entry.path, full, entry.sha256)):
        return
    stamp = file_stamp(full)
    if sha256_file(full) != entry.sha256:
        raise ArtifactError(f"{full} does not match its sha256 in the manifest (corrupted); re-export or re-copy it")
    if record is not None and file_stamp(full) == stamp:  # not recorded if it changed while it was hashed
        record.add(entry.path, stamp, entry.sha256)


def verify_files(folder, entries, verify=True):
    """verify_file for each of ``entries``: ``verify`` True checks sizes and sha256 (a file this machine already
    hashed and that is unchanged since is not hashed again, see hash_record), "full" hashes every file, False checks
    sizes only."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: pass True, False or 'full'")
    record = HashRecord(folder) if verify is True else None
    try:
        for entry in entries:
            verify_file(folder, entry, bool(verify), record)
    finally:
        if record is not None:
            record.save()

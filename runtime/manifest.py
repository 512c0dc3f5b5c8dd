"""The artifact manifest (``manifest.json``): what an exported folder holds and how to call each graph.

Standard library only: the exporter writes it, the runtime reads it, neither needs the other. One entry per
compiled graph (name, format, bucket), with its files and hashes, ordered inputs/outputs, and the error measured
against the MindSpore model at export time.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "mindir")


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
    path: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d):
        return cls(path=d["path"], sha256=d["sha256"], size=int(d["size"]))


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

    @property
    def key(self):
        return graph_key(self.name, self.format, self.bucket)

    @property
    def main_file(self):
        return self.files[0].path

    @classmethod
    def from_dict(cls, d):
        return cls(
            name=d["name"],
            format=d["format"],
            bucket=dict(d["bucket"]),
            files=[FileEntry.from_dict(f) for f in d["files"]],
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
            max_abs_error=d.get("max_abs_error"),
            tolerance=d.get("tolerance"),
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
                graphs=[GraphEntry.from_dict(g) for g in d["graphs"]],
                files=[FileEntry.from_dict(f) for f in d.get("files", [])],
                options=d.get("options", {}),
                schema_version=version,
            )
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


def file_entry(folder, path):
    """A FileEntry for ``folder/path`` (path relative to the artifact folder)."""
    full = Path(folder) / path
    return FileEntry(path=str(path), sha256=sha256_file(full), size=full.stat().st_size)


def verify_file(folder, entry, check_hash=True):
    full = Path(folder) / entry.path
    if not full.is_file():
        raise ArtifactError(f"{full} is missing from the artifact; re-export it (svd-export) or copy the whole folder")
    size = full.stat().st_size
    if size != entry.size:
        raise ArtifactError(
            f"{full} is {size} bytes but the manifest says {entry.size} (truncated or replaced); re-export or re-copy it"
        )
    if check_hash and sha256_file(full) != entry.sha256:
        raise ArtifactError(f"{full} does not match its sha256 in the manifest (corrupted); re-export or re-copy it")


def verify_files(folder, entries, check_hash=True):
    for entry in entries:
        verify_file(folder, entry, check_hash)

"""framegraph's per-user cache folder, where the runtime keeps what it builds once per machine (the MindSpore Lite
runtime, OpenVINO's compiled models)."""

import os
from pathlib import Path


def cache_root():
    """``$FRAMEGRAPH_CACHE``, defaulting to ~/.cache/framegraph."""
    return Path(os.environ.get("FRAMEGRAPH_CACHE") or Path.home() / ".cache" / "framegraph")


def hex_name(name, length):
    """Whether ``name`` is ``length`` lowercase hex digits: the names framegraph's cache modules give what they
    write, and the only names their pruning touches."""
    return len(name) == length and all(c in "0123456789abcdef" for c in name)

"""ONNX graph -> MindSpore Lite model (``.ms``), and running one in a child process.

``convert_to_lite`` reads the ONNX graph without its external weights, applies ``lite_rewrites.rewrite_for_lite``,
and writes the rewritten graph into a temporary folder beside links to the original weight files (Lite's converter
reads ONNX external data, so nothing large is copied or embedded). framegraph's converter tool
(``runtime/lite/shim/framegraph_lite_convert.cc``) then runs in a child process: a process that ran Lite's converter
crashes at exit, and Lite cannot share a process with MindSpore. The model keeps NCHW inputs and fp32 weights. Lite
writes ``NAME.ms``, plus ``NAME.msw`` holding the weights when they pass 2 GB (the ``.ms`` names it; keep the two
together). Both are moved into place only when the conversion succeeded.

``run_lite`` runs a converted model in a child process, for callers that have MindSpore loaded (the exporter's
numerical check).
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from ..runtime.lite import install as lite_install
from .lite_rewrites import rewrite_for_lite

logger = logging.getLogger(__name__)

SUCCESS_MARK = "FRAMEGRAPH_CONVERT_OK"
# external initializers up to this size are read into the rewritten graph (Resize scales and sizes among them)
INLINE_EXTERNAL_BYTES = 1 << 16


class LiteConvertError(RuntimeError):
    """Lite's converter (or a run in the child process) failed; the message holds the tail of its output."""


def convert_to_lite(onnx_path, ms_path, install=None, timeout=None, rewrite=True):
    """Convert the ONNX graph at ``onnx_path`` (external data beside it is read) into the Lite model ``ms_path``
    (ending in .ms); ``install`` defaults to ``setup_lite()``. Returns the paths written (the .ms, and the .msw of
    weights past 2 GB). ``rewrite=False`` converts the graph as it is, without ``rewrite_for_lite`` (for
    comparisons: Lite then computes some graphs wrongly)."""
    onnx_path, ms_path = Path(onnx_path), Path(ms_path)
    if ms_path.suffix != ".ms":
        raise ValueError(f"{ms_path}: a MindSpore Lite model path must end in .ms")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    install = install or lite_install.setup_lite()
    if install.converter is None:
        raise LiteConvertError(f"the MindSpore Lite install at {install.home} has no ONNX converter: use the PyPI "
                               "wheel (unset MSLITE_HOME and run `framegraph setup-lite`) or a package with "
                               "tools/converter")
    ms_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lite-convert-", dir=ms_path.parent) as work:
        work = Path(work)
        source = work / "graph" / onnx_path.name
        write_lite_onnx(onnx_path, source, rewrite=rewrite)
        prefix = work / "out" / ms_path.stem
        prefix.parent.mkdir()
        command = [str(install.converter), str(source), str(prefix)]
        logger.info("converting %s to MindSpore Lite", onnx_path)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_child_env())
        produced = sorted(prefix.parent.iterdir())
        if SUCCESS_MARK not in result.stdout or Path(f"{prefix}.ms") not in produced:
            raise LiteConvertError(
                f"MindSpore Lite could not convert {onnx_path} (exit {result.returncode}):\n"
                f"{lite_install.output_tail(result.stdout + result.stderr, 40)}\n"
                "The graph may use an operator Lite 2.0 does not support; the log above names the node (set GLOG_v=1 "
                "for more)")
        written = []
        for stale in (ms_path, ms_path.with_suffix(".msw")):
            if stale.exists():
                stale.unlink()
        for file in produced:
            target = ms_path.with_suffix(file.suffix)
            os.chmod(file, 0o644)  # Lite writes them read-only for the owner
            os.replace(file, target)
            written.append(target)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def write_lite_onnx(onnx_path, target, rewrite=True):
    """Write ``onnx_path``'s graph rewritten for Lite (unless ``rewrite`` is False) to ``target``; its large external
    weights stay in the original files, linked (or copied where links fail) beside ``target`` under their
    ``location`` names."""
    onnx_path, target = Path(onnx_path), Path(target)
    model = onnx.load(str(onnx_path), load_external_data=False)
    base = onnx_path.parent
    locations = set()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        size = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if size <= INLINE_EXTERNAL_BYTES:
            load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        else:
            locations.add(next(e.value for e in tensor.external_data if e.key == "location"))
    if rewrite:
        rewrite_for_lite(model, base)
    target.parent.mkdir(parents=True, exist_ok=True)
    for location in sorted(locations):
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise ValueError(f"{onnx_path}: external data location {location!r} leaves the graph's folder; ONNX "
                             "requires locations relative to it")
        link = target.parent / location
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to((base / location).resolve())
        except OSError:
            shutil.copyfile(base / location, link)
    target.write_bytes(model.SerializeToString())
    return target


def run_lite(ms_path, inputs, num_threads=None, install=None, timeout=None):
    """Run the Lite model ``ms_path`` on ``inputs`` (arrays in the model's input order, or a dict by input name) in
    a child process; returns its outputs as numpy arrays, in the model's output order. ``install`` defaults to the
    one ``find_lite()`` finds (``framegraph setup-lite``)."""
    ms_path = Path(ms_path)
    if not ms_path.is_file():
        raise FileNotFoundError(f"no MindSpore Lite model at {ms_path}")
    install = install or lite_install.find_lite()
    paths = {} if install is None else {k: str(v) if v else "" for k, v in dataclasses.asdict(install).items()}
    with tempfile.TemporaryDirectory(prefix="framegraph-lite-run-") as work:
        feeds, outputs = Path(work) / "inputs.npz", Path(work) / "outputs.npz"
        if isinstance(inputs, dict):
            np.savez(feeds, **{f"name:{k}": np.asarray(v) for k, v in inputs.items()})
        else:
            np.savez(feeds, **{f"index:{i:04d}": np.asarray(v) for i, v in enumerate(inputs)})
        command = [sys.executable, "-c", "import sys; from framegraph.export.lite_convert import _run_child; "
                   "_run_child(*sys.argv[1:])", str(ms_path), str(feeds), str(outputs), str(num_threads or 0),
                   json.dumps(paths)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_child_env())
        if result.returncode != 0 or not outputs.is_file():
            raise LiteConvertError(f"running {ms_path} in MindSpore Lite failed (exit {result.returncode}):\n"
                                   f"{lite_install.output_tail(result.stdout + result.stderr, 40)}")
        with np.load(outputs) as data:
            return [data[key] for key in sorted(data.files)]


def _run_child(ms_path, feeds, outputs, num_threads, paths):
    """The child side of ``run_lite``."""
    from ..runtime.lite.native import LiteModel

    paths = json.loads(paths)
    install = lite_install.LiteInstall(**{k: Path(v) if v else None for k, v in paths.items()}) if paths else None
    with np.load(feeds) as data, LiteModel(ms_path, num_threads=int(num_threads) or None, install=install) as model:
        keys = sorted(data.files)
        if keys and keys[0].startswith("name:"):
            names = [name for name, _, _ in model.inputs()]
            given = {key[len("name:"):] for key in keys}
            if given != set(names):
                raise ValueError(f"{ms_path} takes inputs {names}, got {sorted(given)}")
            arrays = [data[f"name:{name}"] for name in names]
        else:
            arrays = [data[key] for key in keys]
        results = model.predict(arrays)
    np.savez(outputs, **{f"{i:04d}": r for i, r in enumerate(results)})


def _child_env():
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")  # Lite logs errors only, unless the caller asked for more
    return env

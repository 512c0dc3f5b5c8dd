"""The check of a graph too large to run at its size on this machine: proven through small probe sizes.

A full check runs the exported graph and the MindSpore model on the same inputs at the exported size; at the
published sizes that is hours of CPU per graph. A graph whose bucket has more than ``PROBE_ABOVE_PIXELS`` pixels is
checked this way instead (``--full-check`` keeps the full run):

1. The same MindSpore model is exported at four probe sizes (height x width, in multiples ``m`` of the model's
   total down-sampling): P0 = (m, 2m), P1 = (2m, 2m), P2 = (m, 4m), P3 = (2m, 4m), with everything else in the
   bucket (frames, batch, chunk) as it is. The size-dependent rewrites of the export decide at each probe as they
   do at the full size (``size_ratio`` of ``export_onnx``).
2. P0 is checked numerically against the MindSpore model, as any graph is (``check.compare``).
3. The full-size graph is shown to be P0's program at another size: after attention fusion
   (``runtime/backends/ort_attention.py``, which also joins query slices, whose count depends on the size), the
   five graphs are walked together from their outputs. Every node must have the same operator and attributes, every
   weight the same bytes, every float constant the same value, and every integer (shape, slice bound, integer
   attribute) the same value or, where it differs, a bilinear function ``a + b*h + c*w + d*h*w`` of the size: the
   four probes fix ``a, b, c, d`` and the full size's value must be that function's value there.

Why that is sound: an ONNX graph computes a function of its inputs fixed by its operators, attributes, weights and
constants; the exported size enters only through integers (shapes, slice bounds), and through the choice of rewrites,
which step 1 makes as at the full size. So the full-size graph is the checked P0 program, with each size-dependent
integer extrapolated along the law the export itself followed on four sizes; an integer that followed another law
(a size-specific branch, a clamp, an overflow) would break it at the full size and the check fails. P0 is not square,
so an exchange of height and width would fail step 2. What this does not run: the runtime's kernels at the full
size (``--full-check`` does).
"""

import hashlib
import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from framegraph.export.check import ExportCheckError

logger = logging.getLogger(__name__)

PROBE_ABOVE_PIXELS = 512 * 512  # buckets with more pixels than this are checked on probes unless --full-check
PROBE_PREFIX = ".probe-"  # the probes' files in the staging folder


def remove_probes(stage):
    """Delete the probes' files from the staging folder ``stage`` (before its commit)."""
    for path in Path(stage).rglob(f"{PROBE_PREFIX}*"):
        path.unlink()


def probe_sizes(multiple):
    """The probe sizes (height, width): P0, P1, P2, P3 (see the module docstring)."""
    m = multiple
    return [(m, 2 * m), (2 * m, 2 * m), (m, 4 * m), (2 * m, 4 * m)]


def uses_probes(bucket, multiple):
    """Whether ``bucket`` is checked on probes of the size ``multiple`` (None: never): it has more than
    PROBE_ABOVE_PIXELS pixels and is larger than the largest probe in both directions."""
    if multiple is None or "height" not in bucket or "width" not in bucket:
        return False
    largest = probe_sizes(multiple)[-1]
    return (bucket["height"] * bucket["width"] > PROBE_ABOVE_PIXELS and bucket["height"] > largest[0]
            and bucket["width"] > largest[1])


def export_probes(full, spec, make_cell, bucket, multiple, dtype, weights, quantize, bucket_tag):
    """Export ``make_cell``'s model at the probe sizes of ``bucket`` beside ``full`` (its graph exported for
    ``bucket``), reading the weights that ``weights`` (the artifact's SharedWeights) already holds, and prove
    ``full`` to be their program at its size (:func:`prove_same_program`). ``bucket_tag`` names a bucket in file
    names. Returns (P0's graph file, P0's bucket)."""
    import mindspore as ms

    from framegraph.export.onnx_graph import ProbeWeights, SharedWeights, export_onnx

    # beside the weights they read (ONNX Runtime opens no weights file outside a graph's folder); removed before
    # the artifact is committed (remove_probes)
    folder = Path(full).parent
    scratch = SharedWeights(folder / f"{PROBE_PREFIX}{spec.name}_{bucket_tag(bucket)}.weights.bin")
    probe_weights = ProbeWeights(weights, scratch)
    names = [t.name for t in spec.input_specs(bucket, dtype)], [t.name for t in spec.output_specs(bucket, dtype)]
    paths, sizes = [], probe_sizes(multiple)
    for height, width in sizes:
        probe = dict(bucket, height=height, width=width)
        inputs = [ms.Tensor(x) for x in spec.sample_inputs(probe, dtype)]
        ratio = height * width / (bucket["height"] * bucket["width"])
        path = folder / f"{PROBE_PREFIX}{spec.name}_{bucket_tag(probe)}.onnx"
        paths.append(export_onnx(make_cell(probe), inputs, path, *names, probe_weights, quantize, size_ratio=ratio))
    prove_same_program(paths, full, sizes, (bucket["height"], bucket["width"]))
    return paths[0], dict(bucket, height=sizes[0][0], width=sizes[0][1])


class _Weights:
    """sha256 of external initializer data, each (file, offset, length) read once."""

    def __init__(self):
        self.cache = {}

    def digest(self, tensor, graph_dir):
        from framegraph.export.onnx_graph import _initializer_bytes

        info = {e.key: e.value for e in tensor.external_data}
        key = (os.path.realpath(Path(graph_dir) / info["location"]), info.get("offset"), info.get("length"))
        if key not in self.cache:
            self.cache[key] = hashlib.sha256(_initializer_bytes(tensor, graph_dir)).hexdigest()
        return self.cache[key]


class _Program:
    """One graph, attention fused, indexed for the walk."""

    def __init__(self, path, weights):
        import onnx
        from onnx.external_data_helper import uses_external_data

        from framegraph.runtime.backends.ort_attention import fuse_attention

        self.path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        self.fused = fuse_attention(model)
        graph = model.graph
        self.outputs = [v.name for v in graph.output]
        self.inputs = {v.name: i for i, v in enumerate(graph.input)}
        self.producer = {out: (node, i) for node in graph.node for i, out in enumerate(node.output)}
        self.constants = {}
        for tensor in graph.initializer:
            self.constants[tensor.name] = tensor
        self.weights, self.uses_external = weights, uses_external_data

    def constant(self, name):
        """('bytes', dtype, dims, sha) for an external weight, ('array', array) for a constant held in the graph;
        None if ``name`` is not a constant."""
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None:
            found = self.producer.get(name)
            if found is None or found[0].op_type != "Constant":
                return None
            tensor = found[0].attribute[0].t if found[0].attribute[0].name == "value" else None
            if tensor is None:
                return None
        if self.uses_external(tensor):
            return ("bytes", tensor.data_type, tuple(tensor.dims), self.weights.digest(tensor, self.path.parent))
        return ("array", numpy_helper.to_array(tensor))

    def fill(self, name):
        """(value, dtype, dims) of the constant ``name`` if all its elements hold one value, else None."""
        from onnx import helper

        from framegraph.export.onnx_graph import _initializer_bytes

        found = self.constant(name)
        if found[0] == "array":
            array = found[1]
        else:
            tensor = self.constants[name]
            data = _initializer_bytes(tensor, self.path.parent)
            array = np.frombuffer(data, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)
        flat = array.reshape(-1)
        if not flat.size or not np.all(flat == flat[0]):
            return None
        return flat[0].item(), array.dtype.str, tuple(array.shape)


def _law(values, sizes, target):
    """The value at ``target`` (h, w) of the bilinear function through ``values`` at the four probe ``sizes``."""
    (h0, w0), (h1, _), (_, w1) = sizes[0], sizes[1], sizes[2]
    h, w = target
    lh = (Fraction(h1 - h, h1 - h0), Fraction(h - h0, h1 - h0))
    lw = (Fraction(w1 - w, w1 - w0), Fraction(w - w0, w1 - w0))
    corners = {(0, 0): values[0], (1, 0): values[1], (0, 1): values[2], (1, 1): values[3]}
    return sum(v * lh[i] * lw[j] for (i, j), v in corners.items())


class _Walk:
    def __init__(self, programs, sizes, target):
        self.programs, self.sizes, self.target = programs, sizes, target
        self.paired = [{} for _ in programs]  # P0 tensor name -> its partner in each graph
        self.law_integers = 0

    def fail(self, where, why):
        raise ExportCheckError(
            f"{self.programs[-1].path.name}: the graph at {self.target[0]}x{self.target[1]} is not the probe-checked "
            f"program at another size ({why}, at {where!r} of the probe {self.programs[0].path.name}); export with "
            "--full-check to check it at its size, and report this with the model config"
        )

    def integers(self, where, arrays):
        """Equal integer arrays, or ones whose differing elements follow the bilinear law to the full size."""
        if any(a.shape != arrays[0].shape or a.dtype != arrays[0].dtype for a in arrays):
            self.fail(where, "constants of different shapes or types")
        if all(np.array_equal(a, arrays[0]) for a in arrays[1:]):
            return
        if arrays[0].dtype.kind not in "iu":
            self.fail(where, "a float constant that depends on the size")
        flat = [a.reshape(-1) for a in arrays]
        differ = np.nonzero(np.any(np.stack(flat) != flat[0], axis=0))[0]
        for k in differ:
            values = [int(f[k]) for f in flat]
            if _law(values[:4], self.sizes, self.target) != values[4]:
                self.fail(where, f"an integer {values[:4]} at the probe sizes is {values[4]} at the full size, not "
                                 "the bilinear law's value")
            self.law_integers += 1

    def attributes(self, where, nodes):
        from onnx import helper

        names = [sorted(a.name for a in n.attribute) for n in nodes]
        if any(n != names[0] for n in names):
            self.fail(where, "different attributes")
        for name in names[0]:
            values = [helper.get_attribute_value(next(a for a in n.attribute if a.name == name)) for n in nodes]
            if all(v == values[0] for v in values):
                continue
            if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in values):
                self.integers(f"{where}.{name}", [np.asarray(v, dtype=np.int64) for v in values])
            else:
                self.fail(where, f"attribute {name} differs")

    def filled(self, where, names):
        """Constants that differ only in size: each one value throughout (the normalisations' scale of ones, stored
        in the weights file once it is large enough), the same value and type, sizes by the law."""
        fills = [p.fill(n) for n, p in zip(names, self.programs)]
        if any(f is None for f in fills) or len({f[:2] for f in fills}) != 1:
            self.fail(where, "different weights")
        self.integers(f"{where} (shape)", [np.asarray(f[2], dtype=np.int64) for f in fills])

    def tensors(self, names):
        """Walk the tensors ``names`` (one per graph) and everything they are computed from."""
        stack = [tuple(names)]
        while stack:
            names = stack.pop()
            where = names[0]
            seen = [self.paired[i].get(where) for i in range(len(names))]
            if seen[0] is not None:
                if tuple(seen) != names:
                    self.fail(where, "a tensor used in different places")
                continue
            for i, name in enumerate(names):
                self.paired[i][where] = name
            stack.extend(self.tensor(names))

    def tensor(self, names):
        """Compare one tuple of tensors; returns the tuples of their inputs still to walk."""
        where = names[0]
        programs = self.programs
        if all(n == "" for n in names):
            return []
        if all(n in p.inputs for n, p in zip(names, programs)):
            if len({p.inputs[n] for n, p in zip(names, programs)}) != 1:
                self.fail(where, "different graph inputs")
            return []
        constants = [p.constant(n) for n, p in zip(names, programs)]
        if all(c is not None for c in constants):
            kinds = {c[0] for c in constants}
            if kinds == {"array"} and len({(c[1].dtype.str, c[1].shape) for c in constants}) == 1:
                self.integers(where, [c[1] for c in constants])
            elif len({c if c[0] == "bytes" else (c[1].dtype.str, c[1].shape, c[1].tobytes()) for c in constants}) > 1:
                self.filled(where, names)
            return []
        found = [p.producer.get(n) for n, p in zip(names, programs)]
        if any(f is None for f in found):
            self.fail(where, "a computed tensor in one graph, an input or constant in another")
        nodes = [f[0] for f in found]
        first = nodes[0]
        if any((n.op_type, n.domain, len(n.input), len(n.output)) != (first.op_type, first.domain, len(first.input),
                                                                       len(first.output)) for n in nodes):
            self.fail(where, f"different operators ({', '.join(sorted({n.op_type for n in nodes}))})")
        if len({f[1] for f in found}) != 1:
            self.fail(where, "different outputs of one operator")
        self.attributes(where, nodes)
        return [tuple(n.input[k] for n in nodes) for k in range(len(first.input))]


def prove_same_program(probe_paths, full_path, sizes, target):
    """Raise ExportCheckError unless the graph at ``full_path`` (size ``target``) is the program of the four probe
    graphs ``probe_paths`` (sizes ``sizes``) at that size (see the module docstring); returns how many integers
    followed the bilinear law."""
    weights = _Weights()
    programs = [_Program(p, weights) for p in [*probe_paths, full_path]]
    if len({len(p.outputs) for p in programs}) != 1:
        raise ExportCheckError(f"{Path(full_path).name}: its probes have a different number of outputs")
    walk = _Walk(programs, sizes, target)
    for k in range(len(programs[0].outputs)):
        walk.tensors([p.outputs[k] for p in programs])
    logger.info("%s: the probe-checked program at %dx%d (%d attention chains fused, %d integers by the size law)",
                Path(full_path).name, target[0], target[1], programs[-1].fused, walk.law_integers)
    return walk.law_integers

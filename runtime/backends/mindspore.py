"""MindSpore backend: runs the manifest's "mindir" graphs with ``mindspore.load`` + ``nn.GraphCell`` in GRAPH_MODE.

``mindspore.export`` writes ``NAME.mindir``, or for big graphs ``NAME_graph.mindir`` plus ``NAME_variables/``; the
manifest's first file is the graph file either way and MindSpore finds the variables folder beside it.
MindSpore is imported when this backend is constructed, never at package import.
"""

import logging
import mmap

from .base import Backend, BackendUnavailableError, LoadedGraph, check_signature, register_backend

logger = logging.getLogger(__name__)

# mind_ir.proto: ModelProto.graph, GraphProto.input, GraphProto.output (field numbers)
MODEL_GRAPH, GRAPH_INPUT, GRAPH_OUTPUT = 7, 5, 6
# mind_ir TensorProto.DataType names -> numpy dtype names, as the manifest writes them
MINDIR_DTYPES = {
    "FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "FLOAT64": "float64", "BOOL": "bool",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
}

# device argument -> MindSpore device_target
DEVICE_TARGETS = {
    "cpu": "CPU",
    "gpu": "GPU",
    "cuda": "GPU",
    "ascend": "Ascend",
    "npu": "Ascend",
}


def _import_mindspore():
    try:
        import mindspore
    except ImportError as exc:
        raise BackendUnavailableError(
            "the mindspore backend needs MindSpore: pip install -e '.[mindspore]' (mindspore==2.10.0, numpy<2), "
            "or use backend='onnxruntime' with the artifact's onnx graphs"
        ) from exc
    return mindspore


def _device_target(device):
    try:
        return DEVICE_TARGETS[str(device).lower()]
    except KeyError:
        raise ValueError(
            f"device {device!r} is not supported by the mindspore backend; use one of {sorted(DEVICE_TARGETS)}"
        ) from None


def _varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start, end):
    """(field number, start, end) of each length-delimited field of the protobuf message in ``buf[start:end]``;
    the other fields are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos} is not one MindIR writes")
    if pos != end:
        raise ValueError(f"a protobuf field runs past byte {end} (truncated file?)")


def _tensor_signature(tensor, dtypes):
    """(dtype, shape) of a mind_ir TensorProto; a dimension -1 is dynamic, -2 a dynamic rank (shape None)."""
    name = dtypes.get(tensor.data_type, "UNDEFINED")
    dtype = None if name == "UNDEFINED" else MINDIR_DTYPES.get(name, name.lower())
    dims = list(tensor.dims)
    return dtype, None if -2 in dims else dims


def mindir_signature(path):
    """([(name, dtype, shape)] of the inputs, the same of the outputs or None where their layout is not one read
    here) of the MindIR graph file at ``path``, in the graph's order.

    Only the graph's input and output records are parsed: the file is memory-mapped and the weights inside it are
    skipped unread (``mindspore.load_mindir`` would parse a copy of all of them). A tuple output (several outputs)
    lists its elements; a nested tuple leaves the outputs unread.
    """
    from mindspore.train import mind_ir_pb2

    dtypes = {number: name for name, number in mind_ir_pb2.TensorProto.DataType.items()}
    tuple_type = mind_ir_pb2.AttributeProto.TUPLE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        inputs, outputs = [], []
        for number, start, end in _fields(buf, 0, len(buf)):
            if number != MODEL_GRAPH:
                continue
            for field, a, b in _fields(buf, start, end):
                if field in (GRAPH_INPUT, GRAPH_OUTPUT):
                    value = mind_ir_pb2.ValueInfoProto.FromString(buf[a:b])
                    (inputs if field == GRAPH_INPUT else outputs).append(value)
    ins = [(v.name.rsplit(":", 1)[-1],
            *(_tensor_signature(v.tensor[0], dtypes) if len(v.tensor) == 1 else (None, None))) for v in inputs]
    tensors = []
    for value in outputs:
        if len(value.tensor) == 1:
            tensors.append(value.tensor[0])
        elif value.attr_info.type == tuple_type and all(len(e.tensors) == 1 for e in value.attr_info.values):
            tensors.extend(e.tensors[0] for e in value.attr_info.values)
        else:
            return ins, None
    return ins, [(f"output {i}", *_tensor_signature(t, dtypes)) for i, t in enumerate(tensors)]


def check_mindir_signature(path, entry):
    """Check the MindIR graph at ``path`` against the manifest ``entry`` (see ``check_signature``). A GraphCell is
    fed and read by position, so the graph's n-th input and output carry the manifest's n-th name when the counts
    agree. Where the file's records cannot be read, a warning says so and each call is checked instead."""
    from google.protobuf.message import DecodeError

    try:
        inputs, outputs = mindir_signature(path)
    except (OSError, ValueError, IndexError, DecodeError) as exc:
        logger.warning("%s: its inputs and outputs could not be read (%s); they are checked on each call instead",
                       path, exc)
        return
    if len(inputs) == len(entry.inputs):
        inputs = [(spec.name, dtype, shape) for spec, (_, dtype, shape) in zip(entry.inputs, inputs)]
    if outputs is not None and len(outputs) == len(entry.outputs):
        outputs = [(spec.name, dtype, shape) for spec, (_, dtype, shape) in zip(entry.outputs, outputs)]
    check_signature(entry, path, inputs, outputs)


@register_backend
class MindSporeBackend(Backend):
    """``device`` "cpu" (default), "gpu" or "ascend"; ``device_id`` picks the card; ``num_threads`` CPU op threads.

    MindSpore's device and mode are process-wide: constructing this backend sets GRAPH_MODE and the device.
    """

    name = "mindspore"
    format = "mindir"

    def __init__(self, device="cpu", num_threads=None, device_id=None):
        self.device_target = _device_target(device)
        self.ms = _import_mindspore()
        self.num_threads = num_threads
        self.ms.set_context(mode=self.ms.GRAPH_MODE)
        if self._device_already(device_id):
            logger.debug("MindSpore already runs on %s in this process", self.device_target)
        else:
            self._set_device(device_id)
        if num_threads and self.device_target == "CPU":
            self._set_cpu_threads(int(num_threads))

    def _device_already(self, device_id):
        """MindSpore fixes its device once kernels have run; reusing the same device is fine."""
        try:
            same_target = self.ms.get_context("device_target") == self.device_target
            same_id = device_id is None or int(self.ms.get_context("device_id")) == int(device_id)
        except (RuntimeError, ValueError):
            return False
        return same_target and same_id

    def _set_device(self, device_id):
        try:
            if device_id is None:
                self.ms.set_device(self.device_target)
            else:
                self.ms.set_device(self.device_target, int(device_id))
        except RuntimeError as exc:
            raise BackendUnavailableError(
                f"MindSpore cannot use device_target={self.device_target!r} here ({str(exc).splitlines()[0]}); install "
                "the MindSpore build for that device or use device='cpu'"
            ) from exc

    def __repr__(self):
        return f"MindSporeBackend(device_target={self.device_target!r}, num_threads={self.num_threads})"

    def _set_cpu_threads(self, num_threads):
        try:
            from mindspore.device_context.cpu.op_tuning import threads_num

            threads_num(num_threads)
        except (ImportError, RuntimeError, ValueError) as exc:
            logger.warning("could not set MindSpore CPU threads to %d (%s); using its default", num_threads, exc)

    def _load(self, path, entry, exclusive, streamed=False):
        cell = self.ms.nn.GraphCell(self.ms.load(str(path)))
        check_mindir_signature(path, entry)
        return MindSporeGraph(cell, self.ms)


class MindSporeGraph(LoadedGraph):
    """A MindSpore GraphCell (``native``), fed and read by position; it maps no weights and keeps no memory that
    ``shrink`` could give back."""

    def __init__(self, cell, ms):
        super().__init__(cell)
        self._ms = ms

    def run(self, arrays, shrink=False):
        outputs = self.native(*[self._ms.Tensor(a) for a in arrays])
        if not isinstance(outputs, (tuple, list)):
            outputs = [outputs]
        return [o.asnumpy() for o in outputs]

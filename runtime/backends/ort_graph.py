"""An opened ONNX graph as ONNX Runtime runs it: one session, or one session per part run one after another."""

from ..heap import trim_heap
from .base import LoadedGraph


class OnnxRuntimeGraph(LoadedGraph):
    """``stages``: [(InferenceSession, [MappedInitializer] it reads)] in running order, one for a graph run whole,
    one per part for a graph cut into parts (see onnx_parts): the first part takes the graph's inputs, each part
    hands its one output to the next, the last gives the graph's outputs. ``native`` is the session, or the list of
    the parts' sessions.

    ``mapped`` are all the mapped weights the sessions read (they live as long as this graph): ``release_memory``
    gives all their pages back. ``read_in_place`` are the MappedWeights the runs read from their mapping (not those
    ONNX Runtime copied into its own layout when it built the sessions): ``prefetch_memory`` brings those in.
    ``streamed``: nothing stays resident between runs; each stage's mapped pages are given back as soon as it has
    run, before the next stage's come in, and the run shrinks ONNX Runtime's arena at its end as ``shrink=True``
    does.
    """

    def __init__(self, ort, stages, input_names, output_names, mapped=(), read_in_place=(), streamed=False):
        sessions = [session for session, _ in stages]
        super().__init__(sessions[0] if len(sessions) == 1 else sessions)
        self._stages = list(stages)
        self._input_names = list(input_names)
        self._output_names = list(output_names)
        self._mapped = list(mapped)
        self._read_in_place = list(read_in_place)
        self._streamed = bool(streamed)
        self._shrinking = ort.RunOptions()  # the working memory of the run leaves the process at its end
        self._shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, arrays, shrink=False):
        feeds = dict(zip(self._input_names, arrays))
        run_options = self._shrinking if self._streamed or shrink else None
        last = len(self._stages) - 1
        for number, (session, weights) in enumerate(self._stages):
            names = self._output_names if number == last else [session.get_outputs()[0].name]
            outputs = session.run(names, feeds, run_options)
            if self._streamed:  # this stage's pages leave before the next stage's come in
                for item in weights:
                    item.weight.release()
            if number < last:
                feeds = {self._stages[number + 1][0].get_inputs()[0].name: outputs[0]}
        if run_options is not None:
            trim_heap()
        return outputs

    def release_memory(self):
        return sum(item.weight.release() for item in self._mapped)

    def prefetch_memory(self):
        return sum(weight.populate() for weight in self._read_in_place)

"""What one pipeline kind exports (:class:`Recipe`), written by that kind's recipe function.

A recipe function (``recipe`` in each kind's module) takes a
PipelineFolder and ExportOptions, fills the options' ``None`` fields with the pipeline's defaults, and returns a Recipe.
It must be a module-level function: the driver hands it to child processes, which call it again to rebuild the same
recipe.

A leaf: it imports no other ``framegraph.export`` module, so every one of them may import it.
"""

import dataclasses


@dataclasses.dataclass
class Recipe:
    """The graphs of one pipeline kind for one set of options, and what its manifest says about them."""

    kind: str  # the manifest's ``pipeline`` field: the runtime pipeline's PIPELINE_KIND
    # [(component folder, {graph name: cell factory})]; a cell factory takes the built model and a bucket and returns
    # the MindSpore cell to trace (a module-level function: child processes receive it pickled)
    components: list
    specs: dict  # graph name -> GraphSpec (specs.py)
    plan: list  # [(graph name, bucket)]: every graph to compile, in order
    constants: dict  # the manifest's constants: model sizes the runtime reads
    defaults: dict  # the manifest's defaults: call arguments the runtime uses when a call leaves them out
    copied_files: tuple  # files and folders of the pipeline folder copied into the artifact as they are
    size_multiple: int  # height and width must be multiples of this (the model's total down-sampling)
    required_files: tuple = ()  # copied files the runtime cannot work without

    def buckets(self, name):
        """The buckets the plan compiles graph ``name`` for, in plan order."""
        return [bucket for graph, bucket in self.plan if graph == name]

    def graph_count(self, formats):
        """How many graphs the export writes (one per planned (graph, bucket) and format): the progress total."""
        return len(self.plan) * len(formats)


def whole_model(net, bucket):
    """The cell factory of a graph that is the built model itself (no wrapper, the same for every bucket)."""
    return net

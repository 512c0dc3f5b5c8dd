"""Which recipe exports which pipeline: the diffusers pipeline class (``_class_name`` in model_index.json) -> the
recipe module registered for its kind in ``framegraph.runtime.pipelines.PIPELINES`` (the one registration of a
pipeline kind, docs/export.md); each recipe module has a ``recipe(pipeline_folder, options)``. Nothing dispatches on
class names elsewhere."""

import importlib

from framegraph.runtime.pipelines import PIPELINES


def recipe_function(pipeline):
    """The recipe function of ``pipeline`` (a PipelineFolder), for ``driver.export_pipeline``."""
    by_class = {entry.class_name: entry for entry in PIPELINES.values()}
    name = pipeline.pipeline_class
    if name not in by_class:
        raise ValueError(f"framegraph cannot export pipeline class {name!r} (the _class_name in "
                         f"{pipeline.folder}/model_index.json); supported: {sorted(by_class)}")
    return importlib.import_module(by_class[name].export_module).recipe

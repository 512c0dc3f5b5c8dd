"""Which recipe exports which pipeline: the diffusers pipeline class (``_class_name`` in model_index.json) -> its
recipe function. Adding a pipeline kind adds one line here (docs/export.md); nothing dispatches on class names
elsewhere."""

from framegraph.export.svd import svd_recipe
from framegraph.export.t2v import t2v_recipe

RECIPES = {
    "StableVideoDiffusionPipeline": svd_recipe,
    "TextToVideoSDPipeline": t2v_recipe,
}


def recipe_function(pipeline):
    """The recipe function of ``pipeline`` (a PipelineFolder), for ``driver.export_pipeline``."""
    name = pipeline.pipeline_class
    if name not in RECIPES:
        raise ValueError(f"framegraph cannot export pipeline class {name!r} (the _class_name in "
                         f"{pipeline.folder}/model_index.json); supported: {sorted(RECIPES)}")
    return RECIPES[name]

"""Which recipe exports which pipeline: the diffusers pipeline class (``_class_name`` in model_index.json) -> its
recipe function. Adding a pipeline kind adds one line here (docs/export.md); nothing dispatches on class names
elsewhere."""

from framegraph.export.stable_video_diffusion import stable_video_diffusion_recipe
from framegraph.export.text_to_video_sd import text_to_video_sd_recipe

RECIPES = {
    "StableVideoDiffusionPipeline": stable_video_diffusion_recipe,
    "TextToVideoSDPipeline": text_to_video_sd_recipe,
}


def recipe_function(pipeline):
    """The recipe function of ``pipeline`` (a PipelineFolder), for ``driver.export_pipeline``."""
    name = pipeline.pipeline_class
    if name not in RECIPES:
        raise ValueError(f"framegraph cannot export pipeline class {name!r} (the _class_name in "
                         f"{pipeline.folder}/model_index.json); supported: {sorted(RECIPES)}")
    return RECIPES[name]

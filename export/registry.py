"""Exporters keyed by the pipeline class in model_index.json (no elif chains on architecture names)."""

import importlib

from tqdm import tqdm

# diffusers pipeline class -> (framegraph.export module, recipe function)
RECIPES = {
    "StableVideoDiffusionPipeline": ("svd", "svd_recipe"),
    "TextToVideoSDPipeline": ("t2v", "t2v_recipe"),
}


def recipe_for(pipeline, options):
    name = pipeline.pipeline_class
    if name not in RECIPES:
        raise ValueError(f"framegraph cannot export pipeline class {name!r}; supported: {sorted(RECIPES)}")
    module, function = RECIPES[name]
    return getattr(importlib.import_module(f"framegraph.export.{module}"), function)(pipeline, options)


def run_export(pipeline, out, options, source_name=None, show_progress=True):
    """Export with a progress bar (one tick per graph and format)."""
    from framegraph.export.pipeline_export import export_pipeline

    recipe = recipe_for(pipeline, options)
    total = len(recipe.plan) * len(options.formats)
    with tqdm(total=total, desc="svd-export", unit="graph", disable=not show_progress) as bar:
        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        return export_pipeline(pipeline, out, options, recipe, source_name, progress)

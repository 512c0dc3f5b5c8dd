"""Step caching (DeepCache) graphs: ``svd-export --cache-branch B`` adds, beside each UNet bucket, a *deep* graph
(the whole UNet, which also outputs the feature entering the (B+1)-th up layer from the end) and a *shallow* graph
(the UNet's inputs plus that feature -> noise_pred; it runs conv_in, the first B down stages and the last B+1 up
layers). The runtime runs the deep graph every ``cache_interval``-th step and the shallow one in between.

The split itself is the model's (``UNetModel._denoise_deep`` / ``_denoise_shallow``); the feature's shape comes from
the UNet config (``models.unet_config.cache_split``). The three UNet graphs share one weights file.
"""

import functools

from framegraph.export.specs import GraphSpec, TensorDef, _randn

DEEP, SHALLOW = "unet_deep", "unet_shallow"
FEATURE = "deep_features"


def _deep_graph(net, bucket, cache_branch):
    from framegraph.models.unet_common import UNetDeepGraph

    return UNetDeepGraph(net, cache_branch)


def _shallow_graph(net, bucket, cache_branch):
    from framegraph.models.unet_common import UNetShallowGraph

    return UNetShallowGraph(net, cache_branch)


def feature_shape(unet_config, cache_branch, vae_scale_factor):
    """bucket -> the cached feature's shape [batch * num_frames, C, h, w] (raises ValueError naming --cache-branch
    for a branch the UNet does not have)."""
    from framegraph.models.unet_config import cache_split

    cache_split(unet_config, cache_branch, 1, 1)  # the range check, before any bucket

    def shape(bucket):
        h, w = bucket["height"] // vae_scale_factor, bucket["width"] // vae_scale_factor
        channels, fh, fw = cache_split(unet_config, cache_branch, h, w)
        return (bucket["batch"] * bucket["num_frames"], channels, fh, fw)

    return shape


def add_step_cache(recipe, unet_config, cache_branch, vae_scale_factor):
    """Add the deep and shallow graphs of ``cache_branch`` to ``recipe`` (in place): their specs (derived from the
    UNet's), factories, one of each per UNet bucket in the plan, and the manifest constant ``cache_branch``."""
    shape = feature_shape(unet_config, cache_branch, vae_scale_factor)
    unet = recipe.specs["unet"]
    feature = TensorDef(FEATURE, "float", shape)
    recipe.specs[DEEP] = GraphSpec(name=DEEP, inputs=unet.inputs, outputs=unet.outputs + (feature,),
                                   sample=unet.sample, bucket_keys=unet.bucket_keys, weights_group="unet")
    recipe.specs[SHALLOW] = GraphSpec(
        name=SHALLOW, inputs=unet.inputs + (feature,), outputs=unet.outputs,
        sample=lambda b, rng: list(unet.sample(b, rng)) + [_randn(rng, shape(b))],
        bucket_keys=unet.bucket_keys, weights_group="unet")
    factories = dict(recipe.components)["unet"]
    factories[DEEP] = functools.partial(_deep_graph, cache_branch=cache_branch)
    factories[SHALLOW] = functools.partial(_shallow_graph, cache_branch=cache_branch)
    plan = []
    for name, bucket in recipe.plan:
        plan.append((name, bucket))
        if name == "unet":
            plan += [(DEEP, dict(bucket)), (SHALLOW, dict(bucket))]
    recipe.plan = plan
    recipe.constants["cache_branch"] = cache_branch
    return recipe

"""Checks that both UNet configs (SVD's spatio-temporal and ModelScope's 3D) make of their block lists."""


def per_down_block(name, value, down_block_types):
    """``value`` (one value, or one per down block) as a list with one entry per down block."""
    n = len(down_block_types)
    if isinstance(value, int):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name}={value!r} needs one entry per down block ({n}: {list(down_block_types)})")
    return list(value)


def check_block_lists(config, down_blocks, up_blocks):
    """Raise ValueError unless ``config`` has as many up blocks and ``block_out_channels`` as down blocks, all of
    kinds this package builds (``down_blocks`` / ``up_blocks``: the supported type names)."""
    n = len(config.down_block_types)
    if len(config.up_block_types) != n:
        raise ValueError(f"{n} down_block_types but {len(config.up_block_types)} up_block_types; give as many of each")
    if len(config.block_out_channels) != n:
        raise ValueError(
            f"{len(config.block_out_channels)} block_out_channels for {n} down blocks; give one per block"
        )
    for kind, names, known in (
        ("down", config.down_block_types, down_blocks),
        ("up", config.up_block_types, up_blocks),
    ):
        unknown = [b for b in names if b not in known]
        if unknown:
            raise ValueError(f"unsupported {kind} block types {unknown}; supported: {sorted(known)}")


def cache_split(config, cache_branch, latent_height, latent_width):
    """Where step caching's ``cache_branch`` cuts the UNet of ``config`` (its config.json as a dict) for latents of
    ``latent_height`` x ``latent_width``: the per-frame shape (channels, height, width) of the cached feature, the
    activation entering the (cache_branch+1)-th up layer from the end (see UNetModel._denoise_deep).

    Raises ValueError naming ``--cache-branch`` unless 0 <= cache_branch < the number of up layers.
    """
    channels = list(config["block_out_channels"])
    n = len(channels)
    layers = per_down_block("layers_per_block", config.get("layers_per_block", 2), config["down_block_types"])
    up_layers = [layers[n - 1 - j] + 1 for j in range(n)]  # up block j mirrors down block n-1-j
    count = sum(up_layers)
    if isinstance(cache_branch, bool) or not isinstance(cache_branch, int) or not 0 <= cache_branch < count:
        raise ValueError(
            f"--cache-branch {cache_branch!r} is out of range: this UNet has {count} up layers, so pass 0 (cache "
            f"the most, the fastest shallow steps) to {count - 1} (cache only the bottom)")
    entry = count - 1 - cache_branch
    rev = channels[::-1]
    for j, size in enumerate(up_layers):
        if entry < size:
            scale = 2 ** (n - 1 - j)
            feature_channels = rev[max(j - 1, 0)] if entry == 0 else rev[j]
            return feature_channels, latent_height // scale, latent_width // scale
        entry -= size
    raise AssertionError("unreachable")

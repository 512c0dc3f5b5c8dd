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

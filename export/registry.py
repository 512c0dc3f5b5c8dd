"""Exporters keyed by the pipeline class in model_index.json (no elif chains on architecture names)."""

import dataclasses

from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Exporter:
    pipeline_class: str
    run: object  # callable(pipeline, args, source_name) -> artifact path


def _run_svd(pipeline, args, source_name):
    from framegraph.export.svd import SvdExportOptions, export_svd
    from framegraph.export.svd_specs import svd_buckets

    options = SvdExportOptions(
        frames=args.frames, height=args.height or 576, width=args.width or 1024, batch=args.batch,
        formats=args.formats, dtype=args.dtype, decode_chunk_sizes=args.decode_chunk_sizes, check=args.check,
    )
    frames = options.frames or [int(pipeline.config("unet").get("num_frames", 25))]
    total = len(svd_buckets(frames, options.height, options.width, options.batch, options.decode_chunk_sizes))
    with tqdm(total=total * len(options.formats), desc="svd-export", unit="graph") as bar:
        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        return export_svd(pipeline, args.out, options, source_name=source_name, progress=progress)


EXPORTERS = {e.pipeline_class: e for e in (Exporter("StableVideoDiffusionPipeline", _run_svd),)}


def exporter_for(pipeline_class):
    if pipeline_class not in EXPORTERS:
        raise ValueError(
            f"framegraph cannot export pipeline class {pipeline_class!r}; supported: {sorted(EXPORTERS)}"
        )
    return EXPORTERS[pipeline_class]

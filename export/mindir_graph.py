"""MindSpore cell -> MindIR file(s), and the MindSpore Lite converter config for Ascend."""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def export_mindir(cell, inputs, path):
    """Export to ``path`` (``NAME.mindir``); returns the written files, graph file first.

    Graphs with weights over 2 GB come out as ``NAME_graph.mindir`` + ``NAME_variables/data_*``.
    """
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    ms.export(cell, *inputs, file_name=str(stem), file_format="MINDIR")
    if path.is_file():
        return [path]
    graph = stem.parent / f"{stem.name}_graph.mindir"
    variables = stem.parent / f"{stem.name}_variables"
    if not graph.is_file():
        raise RuntimeError(f"mindspore.export did not write {path} or {graph}")
    files = [graph] + sorted(p for p in variables.rglob("*") if p.is_file())
    logger.info("wrote %s (+%d weight files)", graph, len(files) - 1)
    return files


def write_converter_config(path, input_specs):
    """A ``converter_lite --configFile`` for Ascend with the graph's static input shapes."""
    shapes = ";".join(f"{t.name}:[{','.join(str(d) for d in t.shape)}]" for t in input_specs)
    text = (
        "# converter_lite --fmk=MINDIR --modelFile=<graph>.mindir --outputFile=<graph> --saveType=MINDIR "
        "--optimize=ascend_oriented --configFile=<this file>\n"
        "[ascend_context]\n"
        f"input_shape={shapes}\n"
    )
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)

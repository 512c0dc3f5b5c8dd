"""The manifest is checked, not trusted: its file paths stay inside the artifact folder (absolute paths, '..' and
symlinks leading out are refused), every graph lists its graph file, and each graph's declared inputs and outputs
(names, dtypes, shapes) must be those of the graph file the backend opened, before any call."""

import dataclasses
import json

import numpy as np
import pytest

from framegraph.runtime.artifact import Artifact
from framegraph.runtime.backends import GraphInputError, load_backend
from framegraph.runtime.manifest import (
    MANIFEST_NAME,
    ArtifactError,
    FileEntry,
    GraphEntry,
    Manifest,
    TensorSpec,
    file_entry,
    verify_file,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from helpers import tiny_onnx_model  # noqa: E402

SHAPE = [1, 2, 3]
INPUTS = [TensorSpec("sample", "float32", SHAPE), TensorSpec("timestep", "float32", [])]
OUTPUTS = [TensorSpec("out", "float32", SHAPE), TensorSpec("doubled", "float32", SHAPE)]
KEY = "unet/onnx/num_frames=2"


def build_onnx(path, sample_shape=SHAPE, out_shape=SHAPE):
    """The tiny graph of ``helpers.tiny_onnx_model`` at ``path``."""
    onnx.save(tiny_onnx_model(sample_shape, out_shape), str(path))


def write_manifest(folder, files, inputs=INPUTS, outputs=OUTPUTS, fmt="onnx", extra_files=()):
    entry = GraphEntry(name="unet", format=fmt, bucket={"num_frames": 2}, files=list(files), inputs=list(inputs),
                       outputs=list(outputs))
    Manifest(pipeline="test", source={}, toolchain={}, constants={}, scheduler={}, defaults={}, graphs=[entry],
             files=list(extra_files)).save(folder)
    return entry


def edit_manifest(folder, change):
    """Apply ``change(data)`` to the manifest JSON as a hand edit would."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def feeds():
    return {"sample": np.ones(SHAPE, np.float32), "timestep": np.array(3.0, np.float32)}


@pytest.fixture
def artifact(tmp_path):
    """(artifact folder, a real file next to it, outside it)."""
    folder = tmp_path / "artifact"
    folder.mkdir()
    build_onnx(folder / "unet.onnx")
    write_manifest(folder, [file_entry(folder, "unet.onnx")])
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the artifact")
    return folder, outside


def outside_entry(outside, path):
    """A FileEntry at ``path`` whose size and sha256 are those of the outside file (so that only the path is
    wrong)."""
    entry = file_entry(outside.parent, outside.name)
    return {"path": path, "sha256": entry.sha256, "size": entry.size}


# -- (a) paths leave the folder: refused at parse time ---------------------------------------------------------
@pytest.mark.parametrize("path, problem", [
    ("../outside.bin", "has a '..' component"),
    ("sub/../../outside.bin", "has a '..' component"),
    ("..\\outside.bin", "has a '..' component"),
    (None, "is an absolute path"),  # the outside file's absolute path
    ("C:/outside.bin", "is an absolute path"),
], ids=["parent", "nested-parent", "windows-parent", "absolute", "windows-drive"])
def test_graph_file_paths_leading_out_are_refused_when_the_manifest_is_read(artifact, path, problem):
    folder, outside = artifact
    path = str(outside) if path is None else path
    edit_manifest(folder, lambda d: d["graphs"][0]["files"].append(outside_entry(outside, path)))
    with pytest.raises(ArtifactError) as info:
        Manifest.load(folder)
    message = str(info.value)
    assert str(folder / MANIFEST_NAME) in message and f"graph {KEY}" in message and repr(path) in message
    assert problem in message and "re-export the artifact" in message
    with pytest.raises(ArtifactError, match="may only name files inside its artifact folder"):
        Artifact(folder, "test", verify=False)


def test_other_file_paths_leading_out_are_refused_too(artifact):
    folder, outside = artifact
    edit_manifest(folder, lambda d: d["files"].append(outside_entry(outside, "../outside.bin")))
    with pytest.raises(ArtifactError, match=r"file '\.\./outside\.bin' of the artifact has a '\.\.' component"):
        Manifest.load(folder)


def test_entries_built_in_code_are_refused_where_they_are_read(artifact):
    """An entry that never went through a manifest file is checked by the same rule where it is hashed or read."""
    folder, outside = artifact
    entry = FileEntry(**outside_entry(outside, "../outside.bin"))
    with pytest.raises(ArtifactError, match=r"'\.\./outside\.bin' .*has a '\.\.' component"):
        verify_file(folder, entry)
    with pytest.raises(ArtifactError, match="has a '..' component"):
        file_entry(folder, "../outside.bin")
    graph = GraphEntry(name="unet", format="onnx", bucket={"num_frames": 2}, files=[entry], inputs=INPUTS,
                       outputs=OUTPUTS)
    with pytest.raises(ArtifactError, match="has a '..' component"):
        load_backend("onnxruntime").open(folder, graph)


# -- (a) symlinks leading out: refused where the file is verified or opened ----------------------------------
def test_a_symlink_leading_out_of_the_folder_is_refused(artifact):
    folder, outside = artifact
    (folder / "weights.bin").symlink_to(outside)
    edit_manifest(folder, lambda d: d["graphs"][0]["files"].append(outside_entry(outside, "weights.bin")))
    manifest = Manifest.load(folder)  # a plain relative path: only resolving it shows where it leads
    outside_text = f"resolves to {outside.resolve()}, outside the artifact folder {folder.resolve()}"
    for verify in (True, False):
        with pytest.raises(ArtifactError) as info:
            Artifact(folder, "test", verify=verify)
        assert outside_text in str(info.value) and "re-export the artifact" in str(info.value)
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        load_backend("onnxruntime").open(folder, manifest.find("unet", "onnx", num_frames=2))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        file_entry(folder, "weights.bin")


def test_symlinks_that_stay_inside_and_a_linked_folder_are_accepted(artifact, tmp_path):
    folder, _ = artifact
    (folder / "weights").mkdir()
    (folder / "weights" / "w.bin").write_bytes(b"weights")
    (folder / "alias.bin").symlink_to(folder / "weights" / "w.bin")
    edit_manifest(folder, lambda d: d["graphs"][0]["files"].append(dataclasses.asdict(file_entry(folder, "alias.bin"))))
    link = tmp_path / "linked"
    link.symlink_to(folder)  # the artifact reached through a link to its folder
    for path in (folder, link):
        artifact = Artifact(path, "test")
        out = artifact.graph("unet", num_frames=2)(**feeds())
        np.testing.assert_array_equal(out["out"], np.full(SHAPE, 4.0, np.float32))


# -- (b) a graph without files ---------------------------------------------------------------------------------
def test_a_graph_without_files_is_refused_when_the_manifest_is_read(artifact):
    folder, _ = artifact
    edit_manifest(folder, lambda d: d["graphs"][0].update(files=[]))
    with pytest.raises(ArtifactError) as info:
        Manifest.load(folder)
    message = str(info.value)
    assert f"graph {KEY} lists no files" in message and str(folder / MANIFEST_NAME) in message
    assert "re-export the artifact" in message
    entry = GraphEntry(name="unet", format="onnx", bucket={"num_frames": 2}, files=[], inputs=INPUTS,
                       outputs=OUTPUTS)
    with pytest.raises(ArtifactError, match=f"graph {KEY} lists no files"):
        entry.main_file  # noqa: B018  (an entry built in code: a clear error, not an IndexError)


# -- (c) declared inputs and outputs against the graph file ----------------------------------------------------
def _set(kind, index, **values):
    return lambda d: d["graphs"][0][kind][index].update(values)


@pytest.mark.parametrize("change, difference", [
    (_set("inputs", 0, shape=[1, 2, 4]),
     "input 'sample': the manifest says dtype float32, shape [1, 2, 4], the graph file has dtype float32, shape "
     "[1, 2, 3]"),
    (_set("inputs", 1, shape=[1]),
     "input 'timestep': the manifest says dtype float32, shape [1], the graph file has dtype float32, shape []"),
    (_set("inputs", 0, dtype="float16"),
     "input 'sample': the manifest says dtype float16, shape [1, 2, 3], the graph file has dtype float32"),
    (_set("outputs", 1, dtype="float16"),
     "output 'doubled': the manifest says dtype float16, shape [1, 2, 3], the graph file has dtype float32"),
    (_set("outputs", 0, shape=[1, 2, 4]),
     "output 'out': the manifest says dtype float32, shape [1, 2, 4], the graph file has dtype float32, shape "
     "[1, 2, 3]"),
], ids=["input-shape", "input-rank", "input-dtype", "output-dtype", "output-shape"])
def test_an_edited_signature_is_refused_when_the_graph_is_opened(artifact, change, difference):
    folder, _ = artifact
    edit_manifest(folder, change)
    artifact = Artifact(folder, "test")  # the files are intact: the manifest's declarations are what changed
    with pytest.raises(ArtifactError) as info:
        artifact.graph("unet", num_frames=2)
    message = str(info.value)
    assert f"{folder / 'unet.onnx'} does not match its manifest entry {KEY}" in message
    assert difference in message and "re-export the artifact" in message
    assert artifact.open_graphs() == []


def test_an_edited_input_name_is_refused_when_the_graph_is_opened(artifact):
    folder, _ = artifact
    edit_manifest(folder, _set("inputs", 0, name="latents"))
    with pytest.raises(ArtifactError, match=r"has inputs \['sample', 'timestep'\] .* lists inputs \['latents'"):
        Artifact(folder, "test").graph("unet", num_frames=2)


def test_dimensions_the_graph_leaves_open_are_checked_on_each_call(tmp_path):
    """A symbolic dimension matches any manifest size (its rank must still agree): the manifest's size is then
    checked on each call, of the inputs and of the outputs the graph returns."""
    build_onnx(tmp_path / "unet.onnx", sample_shape=["batch", 2, 3], out_shape=["batch", 2, 3])
    files = [file_entry(tmp_path, "unet.onnx")]
    wrong_out = [TensorSpec("out", "float32", [2, 2, 3]), OUTPUTS[1]]
    graph = load_backend("onnxruntime").open(tmp_path, write_manifest(tmp_path, files, outputs=wrong_out))
    with pytest.raises(ArtifactError, match=r"output 'out' is dtype float32, shape \[1, 2, 3\] but the manifest says "
                                            r"dtype float32, shape \[2, 2, 3\]"):
        graph(**feeds())
    with pytest.raises(GraphInputError, match="reshape the input"):  # the manifest fixes the open dimension
        graph(sample=np.ones([2, 2, 3], np.float32), timestep=np.array(1.0, np.float32))
    rank = [TensorSpec("sample", "float32", [1, 6]), INPUTS[1]]
    with pytest.raises(ArtifactError, match=r"the manifest says dtype float32, shape \[1, 6\], the graph file has "
                                            r"dtype float32, shape \[\?, 2, 3\]"):
        load_backend("onnxruntime").open(tmp_path, write_manifest(tmp_path, files, inputs=rank))


def test_an_onnx_tensor_declared_without_a_shape_is_not_taken_for_a_scalar(tmp_path):
    """ONNX Runtime reports [] both for a scalar and for a tensor declared without a shape: only the scalar's
    declared rank is held against the manifest."""
    build_onnx(tmp_path / "unet.onnx", sample_shape=None)
    files = [file_entry(tmp_path, "unet.onnx")]
    graph = load_backend("onnxruntime").open(tmp_path, write_manifest(tmp_path, files))
    np.testing.assert_array_equal(graph(**feeds())["doubled"], np.full(SHAPE, 2.0, np.float32))
    scalar = [INPUTS[0], TensorSpec("timestep", "float32", [1])]
    with pytest.raises(ArtifactError, match=r"input 'timestep': the manifest says dtype float32, shape \[1\], the "
                                            r"graph file has dtype float32, shape \[\]"):
        load_backend("onnxruntime").open(tmp_path, write_manifest(tmp_path, files, inputs=scalar))


def test_a_graph_run_in_parts_is_checked_on_its_first_and_last_part(tmp_path):
    """A streamed graph cut into parts: its inputs are the first part's, its outputs the last part's."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], initializer=weights,
    )
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    onnx.save(model, str(tmp_path / "unet.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    files = [file_entry(tmp_path, "unet.onnx"), file_entry(tmp_path, "w.bin")]
    backend = load_backend("onnxruntime", stream_part_gb=16 * 16 * 4 / 1e9)
    x, y = [TensorSpec("x", "float32", [4, 16])], [TensorSpec("y", "float32", [4, 16])]
    opened = backend.open(tmp_path, write_manifest(tmp_path, files, inputs=x, outputs=y), streamed=True)
    assert isinstance(opened.native, list) and len(opened.native) == 2
    with pytest.raises(ArtifactError, match=r"output 'y': the manifest says dtype float16"):
        backend.open(tmp_path, write_manifest(tmp_path, files, inputs=x, outputs=[TensorSpec("y", "float16", [4, 16])]),
                     streamed=True)
    with pytest.raises(ArtifactError, match=r"input 'x': the manifest says dtype float32, shape \[4, 8\]"):
        backend.open(tmp_path, write_manifest(tmp_path, files, inputs=[TensorSpec("x", "float32", [4, 8])], outputs=y),
                     streamed=True)


def test_check_signature_rule():
    from framegraph.runtime.backends.base import check_signature

    entry = GraphEntry(name="unet", format="onnx", bucket={"num_frames": 2}, files=[], inputs=INPUTS,
                       outputs=OUTPUTS)
    same = [("sample", "float32", [1, 2, 3]), ("timestep", "float32", [])]
    check_signature(entry, "g.onnx", same, None)  # outputs the engine does not list are checked on each call
    open_dims = [("sample", None, ["batch", None, -1]), ("timestep", "float32", None)]
    check_signature(entry, "g.onnx", open_dims, [("out", "float32", [1, 2, 3]), ("doubled", None, None),
                                                 ("extra", "int64", [7])])
    with pytest.raises(ArtifactError, match=r"outputs \['out'\] but the manifest entry .* outputs \['out', 'doubled'"):
        check_signature(entry, "g.onnx", same, [("out", "float32", [1, 2, 3])])
    with pytest.raises(ArtifactError, match=r"the graph file has dtype bfloat16, shape \[1, 2, 3\]"):
        check_signature(entry, "g.onnx", [("sample", "bfloat16", [1, 2, 3]), same[1]])
    bad = GraphEntry(name="unet", format="onnx", bucket={"num_frames": 2}, files=[],
                     inputs=[TensorSpec("sample", "floatx", SHAPE), INPUTS[1]], outputs=OUTPUTS)
    with pytest.raises(ArtifactError, match="gives 'sample' the dtype 'floatx', which is not a numpy dtype"):
        check_signature(bad, "g.onnx", same)


# -- MindSpore (MindSpore Lite's check on a real .ms graph: test_lite_backend.py) ---------------------------
@pytest.mark.mindspore
def test_mindspore_refuses_an_edited_signature_when_the_graph_is_opened(ms, tmp_path):
    class Tiny(ms.nn.Cell):
        def construct(self, sample, timestep):
            return sample * timestep + 1.0, sample * 2.0

    ms.export(Tiny(), *(ms.Tensor(v) for v in feeds().values()), file_name=str(tmp_path / "unet"),
              file_format="MINDIR")
    files = [file_entry(tmp_path, "unet.mindir")]
    backend = load_backend("mindspore")
    backend.open(tmp_path, write_manifest(tmp_path, files, fmt="mindir"))
    wrong = [INPUTS[0], TensorSpec("timestep", "int64", [])]
    with pytest.raises(ArtifactError, match=r"input 'timestep': the manifest says dtype int64, shape \[\], the graph "
                                            r"file has dtype float32, shape \[\]"):
        backend.open(tmp_path, write_manifest(tmp_path, files, inputs=wrong, fmt="mindir"))
    wrong = [OUTPUTS[0], TensorSpec("doubled", "float32", [2, 3])]
    with pytest.raises(ArtifactError, match=r"output 'doubled': the manifest says dtype float32, shape \[2, 3\]"):
        backend.open(tmp_path, write_manifest(tmp_path, files, outputs=wrong, fmt="mindir"))


def test_external_weights_named_by_a_graph_file_stay_beside_it(tmp_path):
    """A graph file whose external-data location leads out of its folder is refused before anything is mapped."""
    from onnx.external_data_helper import set_external_data

    folder = tmp_path / "artifact"
    folder.mkdir()
    build_onnx(folder / "unet.onnx")
    model = onnx.load(str(folder / "unet.onnx"))
    weight = numpy_helper.from_array(np.full([], 2.0, np.float32), "two")
    (tmp_path / "outside.bin").write_bytes(np.float32(2.0).tobytes())
    set_external_data(weight, location="../outside.bin", offset=0, length=4)
    weight.ClearField("raw_data")
    model.graph.initializer[1].CopyFrom(weight)
    onnx.save(model, str(folder / "unet.onnx"))
    entry = write_manifest(folder, [file_entry(folder, "unet.onnx")])
    with pytest.raises(ArtifactError, match=r"outside\.bin"):
        load_backend("onnxruntime", share_weights=True).open(folder, entry)

"""The runtime's memory options: memory-mapped weights shared by bucket sessions, and low-memory mode."""

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES


@pytest.fixture(scope="module")
def input_image():
    return Image.open(FIXTURES / "svd-tiny" / "input.png").convert("RGB")


def _unet_feeds(entry):
    rng = np.random.default_rng(0)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in entry.inputs}


def test_frame_buckets_share_one_mapped_copy_of_the_unet_weights(svd_artifact):
    from framegraph.runtime.artifact import Artifact

    shared = Artifact(svd_artifact, "stable-video-diffusion", resident_buckets=None)
    copied = Artifact(svd_artifact, "stable-video-diffusion", share_weights=False, resident_buckets=None)
    assert shared.backend.share_weights and not copied.backend.share_weights
    entries = [shared.manifest.find("unet", "onnx", num_frames=f, batch=2) for f in (2, 3)]
    for entry in entries:
        graph = shared.graph("unet", **entry.bucket)
        feeds = _unet_feeds(entry)
        np.testing.assert_array_equal(graph(**feeds)["noise_pred"], copied.graph("unet", **entry.bucket)(**feeds)
                                      ["noise_pred"])
    mapped = shared.backend._mapped._weights
    weights_file = (svd_artifact / "unet" / "weights.bin").resolve()
    unet_weights = [k for k in mapped.keys() if k[0] == str(weights_file)]
    # both bucket sessions use the same mapped arrays: one per distinct tensor, and together the whole file
    mapped_bytes = sum(mapped[k].array.nbytes for k in unet_weights)
    assert 0.95 * weights_file.stat().st_size <= mapped_bytes <= weights_file.stat().st_size
    assert len({k[1] for k in unet_weights}) == len(unet_weights)
    del shared, copied


@pytest.mark.parametrize("resident_buckets", [1, 2])
def test_pack_exclusive_packs_the_unet_weights_when_one_bucket_is_resident(svd_artifact, resident_buckets):
    """With pack_exclusive (off by default) and one frame bucket resident (the default) the UNet session is alone with
    its weights: it loads and packs them itself. With two, the bucket sessions share the mapped weights. The
    encoders map theirs either way."""
    from framegraph.runtime.artifact import Artifact

    artifact = Artifact(svd_artifact, "stable-video-diffusion", resident_buckets=resident_buckets,
                        pack_exclusive=True)
    entry = artifact.manifest.find("unet", "onnx", num_frames=2, batch=2)
    unet = artifact.graph("unet", **entry.bucket)
    encoder = artifact.graph("image_encoder", **artifact.manifest.find("image_encoder", "onnx").bucket)
    mapped_files = {key[0] for key in artifact.backend._mapped._weights.keys()}
    assert str((svd_artifact / "image_encoder" / "weights.bin").resolve()) in mapped_files
    unet_mapped = str((svd_artifact / "unet" / "weights.bin").resolve()) in mapped_files
    options = unet.native.get_session_options()
    if resident_buckets == 1:
        assert not unet_mapped
        with pytest.raises(RuntimeError, match="disable_prepacking"):
            options.get_session_config_entry("session.disable_prepacking")
    else:
        assert unet_mapped and options.get_session_config_entry("session.disable_prepacking") == "1"
    assert encoder.native.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    feeds = _unet_feeds(entry)
    shared = Artifact(svd_artifact, "stable-video-diffusion", resident_buckets=resident_buckets,
                      pack_exclusive=False)
    np.testing.assert_allclose(unet(**feeds)["noise_pred"], shared.graph("unet", **entry.bucket)(**feeds)
                               ["noise_pred"], rtol=1e-5, atol=1e-5)
    artifact.close()
    shared.close()


def test_mapped_weights_are_released_with_their_sessions(svd_artifact):
    import gc

    from framegraph.runtime.artifact import Artifact

    artifact = Artifact(svd_artifact, "stable-video-diffusion", pack_exclusive=False)
    entry = artifact.manifest.find("unet", "onnx", num_frames=2, batch=1)
    artifact.graph("unet", **entry.bucket)(**_unet_feeds(entry))
    assert len(artifact.backend._mapped._weights) > 0
    artifact.close()
    gc.collect()
    assert len(artifact.backend._mapped._weights) == 0


@pytest.mark.parametrize("backend", ["onnxruntime", "mindspore"])
def test_low_memory_keeps_one_graph_open_and_gives_the_same_frames(svd_artifact, input_image, backend):
    from framegraph.runtime import StableVideoDiffusionPipeline

    call = {"num_frames": 3, "num_inference_steps": 2, "decode_chunk_size": 2, "output_type": "np", "generator": 3}
    normal = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, backend=backend)
    low = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, backend=backend, low_memory=True)
    for p in (normal, low):
        p.set_progress_bar_config(disable=True)
    opened = []
    original = low.artifact.backend.open

    def spy(folder, entry, **options):
        opened.append((entry.key, list(low.artifact.open_graphs())))
        return original(folder, entry, **options)

    low.artifact.backend.open = spy
    expected = normal(input_image, **call).frames
    np.testing.assert_array_equal(low(input_image, **call).frames, expected)
    assert len(normal.artifact.open_graphs()) == 5  # image encoder, VAE encoder, UNet, decoder chunks 2 and 1
    assert len(low.artifact.open_graphs()) == 1
    # each graph was opened with nothing else open: the previous one was closed first
    assert [o for _, o in opened] == [[]] * len(opened)
    names = [k.split("/")[0] for k, _ in opened]
    assert names == ["image_encoder", "vae_encoder", "unet", "vae_decoder", "vae_decoder"]
    if backend == "onnxruntime":  # activations allocated as produced (no memory pattern): the same numbers
        assert low.artifact.backend.memory_pattern is False and normal.artifact.backend.memory_pattern is None


def test_resident_buckets_keeps_the_most_recent_frame_buckets_open(svd_artifact):
    from framegraph.runtime.artifact import Artifact

    artifact = Artifact(svd_artifact, "stable-video-diffusion")  # resident_buckets=1
    two = artifact.manifest.find("unet", "onnx", num_frames=2, batch=2)
    three = artifact.manifest.find("unet", "onnx", num_frames=3, batch=2)
    first = artifact.graph("unet", **two.bucket)(**_unet_feeds(two))["noise_pred"]
    artifact.graph("image_encoder", batch=1)
    artifact.graph("unet", **three.bucket)(**_unet_feeds(three))
    assert artifact.open_graphs() == sorted([three.key, artifact.manifest.find("image_encoder", "onnx").key])
    again = artifact.graph("unet", **two.bucket)(**_unet_feeds(two))["noise_pred"]
    np.testing.assert_array_equal(again, first)  # a reopened bucket gives the same result
    assert two.key in artifact.open_graphs() and three.key not in artifact.open_graphs()
    unlimited = Artifact(svd_artifact, "stable-video-diffusion", resident_buckets=None)
    for entry in (two, three):
        unlimited.graph("unet", **entry.bucket)
    assert unlimited.open_graphs() == sorted([two.key, three.key])
    with pytest.raises(ValueError, match="resident_buckets"):
        Artifact(svd_artifact, "stable-video-diffusion", resident_buckets=0)


def _resident_bytes(path):
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    import psutil

    return sum(m.rss for m in psutil.Process().memory_maps(grouped=True) if m.path == str(path))


def _run_unet_once(svd_artifact):
    """(artifact, its 2-frame UNet graph, feeds, the graph's output on them, the UNet's weights file)."""
    from framegraph.runtime.artifact import Artifact

    artifact = Artifact(svd_artifact, "stable-video-diffusion", pack_exclusive=False)  # the UNet reads the mapping
    entry = artifact.manifest.find("unet", "onnx", num_frames=2, batch=2)
    graph = artifact.graph("unet", **entry.bucket)
    feeds = _unet_feeds(entry)
    return artifact, graph, feeds, graph(**feeds)["noise_pred"], (svd_artifact / "unet" / "weights.bin").resolve()


def test_released_weight_pages_leave_the_process_and_come_back_on_use(svd_artifact):
    artifact, graph, feeds, expected, weights_file = _run_unet_once(svd_artifact)
    used = _resident_bytes(weights_file)
    assert used > 0.5 * weights_file.stat().st_size  # the run read the weights through the mapping
    assert graph.release_memory() >= weights_file.stat().st_size * 0.95
    assert _resident_bytes(weights_file) < 0.05 * used
    np.testing.assert_array_equal(graph(**feeds)["noise_pred"], expected)
    assert _resident_bytes(weights_file) > 0.5 * weights_file.stat().st_size
    artifact.close()


def test_prefetch_brings_in_what_the_runs_read_and_only_that(svd_artifact):
    """After a release, prefetch_memory maps the Gemm/MatMul weights back in; a run then reads little else
    through the mapping (the convolution weights live in ONNX Runtime's own layout)."""
    artifact, graph, feeds, expected, weights_file = _run_unet_once(svd_artifact)
    graph.release_memory()
    fetched = graph.prefetch_memory()
    assert 0.3 * weights_file.stat().st_size < fetched < weights_file.stat().st_size
    after_prefetch = _resident_bytes(weights_file)
    assert after_prefetch >= 0.95 * fetched
    np.testing.assert_array_equal(graph(**feeds)["noise_pred"], expected)
    # the rest: weights ONNX Runtime does not copy at this tiny size, and the partial pages of tensors under 4 KiB
    assert _resident_bytes(weights_file) - after_prefetch < 0.1 * weights_file.stat().st_size
    artifact.close()


@pytest.mark.parametrize("pack_exclusive", [False, True], ids=["mapped", "pack_exclusive"])
def test_pipeline_gives_back_the_weight_pages_it_read(svd_artifact, input_image, pack_exclusive):
    """The encoders' pages go after encoding, the UNet's mapped pages after the last step (before the decode); the
    next call brings the UNet's in again before its first step."""
    from framegraph.runtime import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, pack_exclusive=pack_exclusive)
    pipe.set_progress_bar_config(disable=True)
    unet_file = (svd_artifact / "unet" / "weights.bin").resolve()
    seen = []
    pipe(input_image, num_frames=2, num_inference_steps=2, decode_chunk_size=2, output_type="np", generator=0,
         callback_on_step_end=lambda p, i, t, kw: seen.append(_resident_bytes(unet_file)))
    encoder_file = (svd_artifact / "image_encoder" / "weights.bin").resolve()
    assert _resident_bytes(encoder_file) < 0.05 * encoder_file.stat().st_size
    if not pack_exclusive:  # during the steps the UNet's runs read its mapped pages; after them they are given back
        assert min(seen) > 0.5 * unet_file.stat().st_size
        assert _resident_bytes(unet_file) < 0.05 * unet_file.stat().st_size
    else:  # its session packed its own copy: its runs do not read the file's pages
        assert max(seen) < 0.5 * unet_file.stat().st_size and _resident_bytes(unet_file) < 0.5 * unet_file.stat().st_size


def test_pipeline_runs_the_image_encoder_in_parts_with_the_same_frames(svd_artifact, input_image):
    """The image encoder is opened streamed: with parts of a few KB of weights it runs in several sessions, each
    part's pages given back as it goes, and the frames are those of the whole encoder (to float rounding)."""
    from framegraph.runtime import StableVideoDiffusionPipeline

    frames = {}
    for part_gb in (0, 2e-5):
        pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, stream_part_gb=part_gb)
        pipe.set_progress_bar_config(disable=True)
        frames[part_gb] = pipe(input_image, num_frames=2, num_inference_steps=1, decode_chunk_size=2,
                               output_type="np", generator=0).frames
        encoder = pipe.artifact.graph("image_encoder", batch=pipe.batch)
        assert isinstance(encoder.native, list) == (part_gb > 0)
        if part_gb:
            assert len(encoder.native) > 2
        weights_file = (svd_artifact / "image_encoder" / "weights.bin").resolve()
        assert _resident_bytes(weights_file) < 0.05 * weights_file.stat().st_size
        pipe.artifact.close()
    # the same nodes; fusions that would have spanned a cut (e.g. a residual Add into the next LayerNorm) are not
    # made, so the float rounding can differ
    np.testing.assert_allclose(frames[0], frames[2e-5], rtol=0, atol=1e-4)


def test_the_last_denoising_step_gives_back_the_unets_working_memory(svd_artifact, input_image):
    """The UNet's last run of a call asks the engine to give back its working memory (Graph.run(shrink=True)), so
    the UNet's activations do not stay through the decode; the runs before it keep it for the next step."""
    from framegraph.runtime import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.artifact.graph("unet", num_frames=2, batch=2, height=32, width=32)
    shrinks, original = [], unet.run

    def run(feeds, shrink=False):
        shrinks.append(shrink)
        return original(feeds, shrink=shrink)

    unet.run = run
    call = dict(num_frames=2, num_inference_steps=3, decode_chunk_size=2, output_type="np", generator=0)
    frames = pipe(input_image, **call).frames
    assert shrinks == [False, False, True]
    unet.run = original
    np.testing.assert_array_equal(pipe(input_image, **call).frames, frames)
    pipe.artifact.close()

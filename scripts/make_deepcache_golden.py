"""Write tests/fixtures/deepcache/: frames of diffusers 0.42.1 pipelines run with step caching by the published
DeepCache package (``DeepCache==0.1.1``, its ``DeepCacheSDHelper``), on the tiny fixtures (torch, CPU, fp32).

The helper wraps the UNet's blocks and layers: every ``cache_interval``-th step runs all of them and keeps their
outputs; the steps in between run only the layers of branch ``cache_branch_id`` and shallower and take the cached
outputs of the rest. framegraph's ``--cache-branch B`` / ``cache_interval=N`` is meant to equal it on UNets of two
layers per down block (svd-tiny, and every published SVD and ModelScope UNet); on t2v-tiny (one layer per block) the
two agree for branches 0 and 1 only, the cases written here.

Needs the reference toolchain (never a runtime dependency): ``pip install -e '.[bench]'`` and
``pip install --no-deps DeepCache==0.1.1``; then ``python scripts/make_deepcache_golden.py``.

Each case is a pipeline call as in ``tests/fixtures/*/golden.json`` (the same latents, and for SVD the same
conditioning-image noise from that fixture's golden.npz) with more steps, so that cached steps occur; golden.json here
lists the cases and the exact call of each.
"""

import argparse
import json
import logging
from pathlib import Path

import diffusers
import numpy as np
import torch

logger = logging.getLogger("make_deepcache_golden")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "deepcache"

# case -> (fixture, steps, cache_interval, cache_branch_id)
CASES = {
    "svd_n2_b0": ("svd-tiny", 4, 2, 0),
    "svd_n3_b0": ("svd-tiny", 5, 3, 0),
    "t2v_n2_b1": ("t2v-tiny", 4, 2, 1),
    "t2v_n3_b1": ("t2v-tiny", 5, 3, 1),
}


def _svd_call(pipe, fixture, steps, golden, spec):
    from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as module
    from PIL import Image

    noise = torch.from_numpy(golden["pipeline.image_noise"])
    original = module.randn_tensor

    def randn_tensor(shape, *args, **kwargs):  # the one draw the pipeline makes when latents are given
        if tuple(shape) != tuple(noise.shape):
            raise RuntimeError(f"unexpected random draw of shape {tuple(shape)}")
        return noise.clone()

    module.randn_tensor = randn_tensor
    try:
        image = Image.open(FIXTURES / fixture / spec["image"])
        return pipe(image, **dict(spec["pipeline_call"], num_inference_steps=steps),
                    latents=torch.from_numpy(golden["pipeline.latents"]), output_type="np").frames
    finally:
        module.randn_tensor = original


def _t2v_call(pipe, fixture, steps, golden, spec):
    return pipe(spec["prompt"], **dict(spec["pipeline_call"], num_inference_steps=steps),
                latents=torch.from_numpy(golden["pipeline.latents"]), output_type="np").frames


def run_case(name, fixture, steps, interval, branch):
    from DeepCache import DeepCacheSDHelper

    spec = json.loads((FIXTURES / fixture / "golden.json").read_text())
    golden = np.load(FIXTURES / fixture / "golden.npz")
    cls = diffusers.StableVideoDiffusionPipeline if fixture == "svd-tiny" else diffusers.TextToVideoSDPipeline
    pipe = cls.from_pretrained(FIXTURES / fixture / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    call = _svd_call if fixture == "svd-tiny" else _t2v_call
    with torch.no_grad():
        plain = np.asarray(call(pipe, fixture, steps, golden, spec), dtype=np.float32)
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            cached = np.asarray(call(pipe, fixture, steps, golden, spec), dtype=np.float32)
        finally:
            helper.disable()
    logger.info("%s: max |cached - uncached| = %.3g", name, np.abs(cached - plain).max())
    call_args = dict(spec["pipeline_call"], num_inference_steps=steps)
    return {"frames": cached, "frames_uncached": plain}, {
        "fixture": fixture, "call": call_args, "cache_interval": interval, "cache_branch": branch,
        "latents": f"{fixture}/golden.npz pipeline.latents", "max_abs_cached_vs_uncached": float(
            np.abs(cached - plain).max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import DeepCache
    from importlib.metadata import version

    torch.manual_seed(0)
    arrays, cases = {}, {}
    for name, (fixture, steps, interval, branch) in CASES.items():
        result, cases[name] = run_case(name, fixture, steps, interval, branch)
        arrays.update({f"{name}.{key}": value for key, value in result.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "golden.npz", **arrays)
    (args.out / "golden.json").write_text(json.dumps({
        "made_by": "scripts/make_deepcache_golden.py", "DeepCache": version("DeepCache"),
        "deepcache_module": DeepCache.__file__.split("site-packages/")[-1], "diffusers": diffusers.__version__,
        "torch": torch.__version__, "cases": cases,
        "keys": {k: list(v.shape) for k, v in arrays.items()}}, indent=1) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Write tests/fixtures/animatelcm-svd/: trajectories of the PUBLISHED AnimateLCM-SVD-xt scheduler (torch, CPU, fp32).

The published code runs as it is, never copied into the repository: ``animatelcm_svd/animatelcm_scheduler.py`` of
github.com/G-U-N/AnimateLCM at commit 413037e49f1c46ac19156d49890043c5704dc4da (the same blob,
86fdf64394224fddc44990685ae8fc66da174356, at f873122358c101cd191533adb9cd517899fbfb01) is read from a clone
(``--repo``), a copy of the file (``--published``) or downloaded at that commit, checked against the blob id, written to
a temporary folder and imported from there.

Needs the reference toolchain (never a runtime dependency), in its own environment:
    python -m venv /tmp/animatelcm-venv
    /tmp/animatelcm-venv/bin/pip install torch==2.13.0 numpy==1.26.4 diffusers==0.42.1
    /tmp/animatelcm-venv/bin/python scripts/make_animatelcm_golden.py --repo PATH/TO/AnimateLCM

The published model repository ships no ``scheduler_config.json``; ``scheduler/scheduler_config.json`` here is what
the published class's ``save_config`` writes for the arguments the published SVD code builds it with (``app.py`` and
``batch_inference.py``: 40 grid points, sigma 0.002..700, sigma_data 1, s_noise 1, rho 7, no clipping).

For each case and step count n: ``set_timesteps(n)`` (or custom grid ``timesteps``); from ``x0``, for each timestep t:
``scaled_inputs[i] = scale_model_input(x, t)``; ``x = step(model_outputs[i], t, x, generator).prev_sample``;
``prev_samples[i] = x``. The noise that ``step`` draws (``randn_tensor``, wrapped to record its result) is saved as
``noises`` (one draw per step, none for one step), so numpy replays it with ``step(..., noise=noises[i])``.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import diffusers
import numpy as np
import torch

logger = logging.getLogger("make_animatelcm_golden")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "animatelcm-svd"
REPO = "G-U-N/AnimateLCM"
COMMIT = "413037e49f1c46ac19156d49890043c5704dc4da"
PATH = "animatelcm_svd/animatelcm_scheduler.py"
BLOB = "86fdf64394224fddc44990685ae8fc66da174356"
CLASS = "AnimateLCMSVDStochasticIterativeScheduler"
# What animatelcm_svd/app.py and batch_inference.py pass to the constructor.
PUBLISHED_ARGS = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, s_noise=1.0, rho=7,
                      clip_denoised=False)
SHAPE = (1, 3, 4, 2, 3)  # (batch, frames, latent channels, height, width), like SVD's latents

# case -> (constructor arguments, schedules: step counts or lists of custom grid timesteps)
CASES = {
    "svd_xt": (PUBLISHED_ARGS, [1, 2, 3, 4, 8, 40]),
    "svd_xt_custom": (PUBLISHED_ARGS, [[39, 25, 12, 3], [20]]),
    "class_defaults": ({}, [4]),  # sigma_data 0.5, sigma_max 80, clip_denoised: the clamp to [-1, 1] is exercised
    "s_noise": ({**PUBLISHED_ARGS, "s_noise": 1.011, "sigma_data": 0.5}, [5]),
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def published_source(repo: Path | None, published: Path | None) -> bytes:
    if published is not None:
        data = published.read_bytes()
    elif repo is not None:
        git_dir = repo / ".git" if (repo / ".git").exists() else repo
        data = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{COMMIT}:{PATH}"], check=True,
                              capture_output=True).stdout
    else:
        url = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/{PATH}"
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    if git_blob_id(data) != BLOB:
        raise SystemExit(f"the published file is not {REPO}@{COMMIT}:{PATH} (blob {git_blob_id(data)} != {BLOB})")
    return data


def import_published(data: bytes, folder: Path):
    path = folder / "animatelcm_scheduler.py"
    path.write_bytes(data)
    spec = importlib.util.spec_from_file_location("animatelcm_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingRandn:
    """Wraps the published module's ``randn_tensor`` and keeps what each call returned."""

    def __init__(self, randn_tensor):
        self.randn_tensor = randn_tensor
        self.draws = []

    def __call__(self, *args, **kwargs):
        tensor = self.randn_tensor(*args, **kwargs)
        self.draws.append(tensor.clone())
        return tensor


def run_trajectory(module, args, schedule, seed):
    """One published-scheduler run; returns the arrays of the golden (numpy)."""
    scheduler = getattr(module, CLASS)(**args)
    if isinstance(schedule, int):
        scheduler.set_timesteps(schedule)
    else:
        scheduler.set_timesteps(timesteps=schedule)
    timesteps = scheduler.timesteps
    n = len(timesteps)
    rng = np.random.default_rng(seed)
    model_outputs = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    x0 = (rng.standard_normal(SHAPE) * scheduler.init_noise_sigma).astype(np.float32)
    generator = torch.Generator().manual_seed(seed)
    recorder = RecordingRandn(module.randn_tensor)
    module.randn_tensor = recorder
    x = torch.from_numpy(x0)
    scaled, prev = [], []
    try:
        for i, t in enumerate(timesteps):
            scaled.append(scheduler.scale_model_input(x, t).numpy())
            with contextlib.redirect_stdout(io.StringIO()):  # the published step prints sigma_hat
                x = scheduler.step(torch.from_numpy(model_outputs[i]), t, x, generator=generator).prev_sample
            prev.append(x.numpy())
    finally:
        module.randn_tensor = recorder.randn_tensor
    noises = np.stack([d.numpy() for d in recorder.draws]) if recorder.draws else np.zeros((0, *SHAPE), np.float32)
    return {
        "timesteps": timesteps.numpy(),
        "sigmas": scheduler.sigmas.numpy(),
        "init_noise_sigma": np.float64(scheduler.init_noise_sigma),
        "x0": x0,
        "model_outputs": model_outputs,
        "noises": noises,
        "scaled_inputs": np.stack(scaled),
        "prev_samples": np.stack(prev),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--repo", type=Path, help="a clone (or bare mirror) of github.com/G-U-N/AnimateLCM")
    source.add_argument("--published", type=Path, help=f"a copy of {PATH} at {COMMIT}")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    data = published_source(args.repo, args.published)

    arrays = {}
    meta = {
        "published": {"repo": REPO, "commit": COMMIT, "path": PATH, "blob": BLOB, "class": CLASS},
        "toolchain": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
        "config": {"file": "scheduler/scheduler_config.json", "args": PUBLISHED_ARGS,
                   "note": "reconstructed: the published model repository ships no scheduler config; this is the "
                           "published class's save_config for the arguments of animatelcm_svd/app.py"},
        "shape": list(SHAPE),
        "how": " ".join(("For each case" + __doc__.split("For each case", 1)[1]).split()),
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="animatelcm-published-") as tmp:
        module = import_published(data, Path(tmp))
        config_dir = args.out / "scheduler"
        getattr(module, CLASS)(**PUBLISHED_ARGS).save_config(config_dir)
        logger.info("wrote %s", config_dir / "scheduler_config.json")

        published = getattr(module, CLASS)(**PUBLISHED_ARGS)  # the training grid, before set_timesteps
        arrays["grid.sigmas"] = published.sigmas.numpy()
        arrays["grid.timesteps"] = published.timesteps.numpy()

        seed = 0
        for case, (ctor_args, schedules) in CASES.items():
            keys = []
            for schedule in schedules:
                seed += 1
                key = f"n{schedule}" if isinstance(schedule, int) else "t" + "_".join(map(str, schedule))
                for name, value in run_trajectory(module, ctor_args, schedule, seed).items():
                    arrays[f"{case}.{key}.{name}"] = value
                keys.append({"key": key, "schedule": schedule, "seed": seed})
                logger.info("%s %s: sigmas %s", case, key, arrays[f"{case}.{key}.sigmas"])
            meta["cases"][case] = {"args": ctor_args, "runs": keys}

        published.set_timesteps(4)  # add_noise: each batch entry at its own timestep
        rng = np.random.default_rng(100)
        original = rng.standard_normal((2, 3, 4)).astype(np.float32)
        noise = rng.standard_normal((2, 3, 4)).astype(np.float32)
        t = published.timesteps[[1, 3]]
        arrays["add_noise.original"] = original
        arrays["add_noise.noise"] = noise
        arrays["add_noise.timesteps"] = t.numpy()
        arrays["add_noise.result"] = published.add_noise(torch.from_numpy(original), torch.from_numpy(noise), t).numpy()

    meta["keys"] = {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in sorted(arrays.items())}
    np.savez_compressed(args.out / "golden.npz", **arrays)
    with open(args.out / "golden.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

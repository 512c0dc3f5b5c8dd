"""Make a diffusers-format pipeline folder with seeded random weights from a folder of configs.

    python scripts/make_random_pipeline.py ../shared/configs/svd-xt out/bench/svd-xt/pipeline --seed 0

Each component is built from its ``config.json`` with diffusers / transformers (one at a time, so that only one is
resident), its constant parameters (norm weights and biases, zero-initialised layers, scalar blend factors) are
perturbed so that every parameter influences the output, and it is written with ``save_pretrained`` as safetensors.
``model_index.json``, the scheduler and feature-extractor configs are copied verbatim. A config folder has no
tokenizer; for text-to-video the tiny CLIP BPE tokenizer of ``tests/fixtures/t2v-tiny`` is copied (benchmarking
only: its 531 ids all fit the real text encoder's 49408-entry embedding).

The folder is reused when its stamp (``bench_pipeline.json``: configs hash, seed, library versions) matches.
This is a benchmark tool: it imports torch, diffusers and transformers (the ``bench`` extra), framegraph never does.
"""

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger("make_random_pipeline")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "t2v-tiny" / "pipeline" / "tokenizer"
STAMP = "bench_pipeline.json"
PERTURB_STD = 0.02

# model_index class name -> (library, class) that builds it from its config
MODEL_BUILDERS = {
    "UNetSpatioTemporalConditionModel": ("diffusers", "UNetSpatioTemporalConditionModel"),
    "AutoencoderKLTemporalDecoder": ("diffusers", "AutoencoderKLTemporalDecoder"),
    "UNet3DConditionModel": ("diffusers", "UNet3DConditionModel"),
    "AutoencoderKL": ("diffusers", "AutoencoderKL"),
    "CLIPVisionModelWithProjection": ("transformers", "CLIPVisionModelWithProjection"),
    "CLIPTextModel": ("transformers", "CLIPTextModel"),
}
# component folders copied verbatim (configs only)
COPIED = ("scheduler", "feature_extractor")


def configs_hash(config_dir):
    """sha256 over every file of the config folder (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(config_dir).rglob("*") if p.is_file()):
        h.update(path.relative_to(config_dir).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def expected_stamp(config_dir, seed):
    import diffusers
    import torch
    import transformers

    return {
        "configs": str(Path(config_dir).resolve()),
        "configs_sha256": configs_hash(config_dir),
        "seed": seed,
        "perturb_std": PERTURB_STD,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def is_current(out, stamp):
    path = Path(out) / STAMP
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == stamp
    except json.JSONDecodeError:
        return False


def build_component(library, class_name, component_dir, seed):
    import importlib

    import torch

    torch.manual_seed(seed)
    cls = getattr(importlib.import_module(library), class_name)
    if library == "diffusers":
        model = cls.from_config(cls.load_config(component_dir))
    else:
        config = importlib.import_module("transformers").AutoConfig.from_pretrained(component_dir)
        model = cls(config)
    perturb_constant_parameters(model, seed)
    return model.eval()


def perturb_constant_parameters(model, seed):
    """Add N(0, PERTURB_STD) to every parameter whose values are all equal (ones, zeros, 0.5 blend factors)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    count = 0
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            if bool((flat == flat[0]).all()):
                param.add_(torch.randn(param.shape, generator=generator) * PERTURB_STD)
                count += 1
    logger.info("perturbed %d constant parameter tensors", count)


def make_pipeline(config_dir, out, seed=0, force=False):
    """Write the random-weight pipeline to ``out`` (unless an identical one is there); return ``out``."""
    config_dir, out = Path(config_dir), Path(out)
    index = json.loads((config_dir / "model_index.json").read_text())
    stamp = expected_stamp(config_dir, seed)
    if not force and is_current(out, stamp):
        logger.info("reusing %s (same configs and seed)", out)
        return out
    if out.exists():
        shutil.rmtree(out)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    shutil.copy2(config_dir / "model_index.json", partial / "model_index.json")
    for i, (component, entry) in enumerate(sorted(index.items())):
        if component.startswith("_") or not isinstance(entry, list) or entry[1] is None:
            continue
        class_name = entry[1]
        source = config_dir / component
        if class_name in MODEL_BUILDERS:
            start = time.perf_counter()
            model = build_component(*MODEL_BUILDERS[class_name], source, seed + 1000 * i)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(partial / component, safe_serialization=True)
            del model
            logger.info("%s: %s, %.1fM parameters, %.1f s", component, class_name, params / 1e6,
                        time.perf_counter() - start)
        elif component == "tokenizer":
            tokenizer_source = source if source.is_dir() else FIXTURE_TOKENIZER
            if tokenizer_source == FIXTURE_TOKENIZER:
                check_tokenizer_fits(config_dir, tokenizer_source)
                logger.info("tokenizer: %s has none; copying the tiny fixture tokenizer (benchmark only)", config_dir)
            shutil.copytree(tokenizer_source, partial / component)
        elif component in COPIED and source.is_dir():
            shutil.copytree(source, partial / component)
        else:
            raise ValueError(f"{config_dir}: don't know how to make component {component!r} ({class_name})")
    (partial / STAMP).write_text(json.dumps(stamp, indent=1))
    partial.rename(out)
    logger.info("random-weight pipeline written to %s", out)
    return out


def check_tokenizer_fits(config_dir, tokenizer_dir):
    vocab = json.loads((Path(tokenizer_dir) / "vocab.json").read_text())
    text_config = json.loads((Path(config_dir) / "text_encoder" / "config.json").read_text())
    if max(vocab.values()) >= int(text_config["vocab_size"]):
        raise ValueError(f"{tokenizer_dir} has ids up to {max(vocab.values())}, beyond the text encoder's "
                         f"vocab_size {text_config['vocab_size']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", help="diffusers-format folder with model_index.json and component config.json files")
    p.add_argument("out", help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if an identical folder is there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    make_pipeline(args.configs, args.out, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

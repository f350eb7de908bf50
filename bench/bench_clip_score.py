"""Cost per image of ``fguide evaluate --clip``: the image processor (PIL resize, crop,
normalise) and CLIP's image tower, for random-weight CLIP ViT-B/32 and ViT-L/14 folders at
224 px (the cost does not depend on the weight values; the text tower is tiny here, it runs
once per prompt).

On CPU: the process's CPU time (``resource.getrusage``) per image, which other processes on
the machine do not inflate as they do wall time; on CUDA: wall time with synchronisation.
One warm-up batch first, then the processor on all images and the tower in one batch.

    python bench/bench_clip_score.py [--images 16] [--size 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny CLIP tokenizer

TOWERS = {  # hidden, layers, heads, MLP width, patch, projection
    "ViT-B/32": (768, 12, 12, 3072, 32, 512),
    "ViT-L/14": (1024, 24, 16, 4096, 14, 768),
}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_folder(path: Path, tower: tuple[int, ...]) -> Path:
    """A random CLIP folder with ``tower``'s vision configuration at 224 px."""
    import transformers
    from sd_folders import write_tokenizer

    hidden, layers, heads, inter, patch, proj = tower
    n = len(write_tokenizer(path))
    text = dict(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2,
        eos_token_id=n - 1, pad_token_id=n - 1,
    )  # fmt: skip
    vision = dict(
        image_size=224, patch_size=patch, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads,
    )  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
    transformers.CLIPModel(config).save_pretrained(path)
    pre = {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224}, "do_resize": True, "do_center_crop": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    }  # fmt: skip
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


def measure(folder: Path, images: np.ndarray, device: torch.device) -> dict[str, float]:
    """Seconds per image of the processor and of the image tower."""
    from fguide.evaluation.clip_score import load_scorer
    from fguide.metrics.clip_score import image_features

    scorer = load_scorer(folder, device, progress=False)
    image_features(scorer.model, scorer.processor, images[:2], 2)  # warm-up
    t0 = _clock(device)
    pixels = scorer.processor(images=list(images), return_tensors="pt")["pixel_values"]
    t1 = _clock(device)
    with torch.no_grad():
        scorer.model.get_image_features(pixel_values=pixels.to(device))
    t2 = _clock(device)
    return {"processor_s": (t1 - t0) / len(images), "tower_s": (t2 - t1) / len(images)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.images, args.size, args.size, 3)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    what = "CPU time" if device.type == "cpu" else "wall time"
    print(f"{args.images} images of {args.size}x{args.size}, {what}, {torch.get_num_threads()} "
          f"threads, {device}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, tower in TOWERS.items():
            folder = build_folder(Path(tmp) / name.replace("/", ""), tower)
            r = measure(folder, images, device)
            print(f"{name}: processor {r['processor_s'] * 1e3:.1f} ms/image, image tower "
                  f"{r['tower_s'] * 1e3:.0f} ms/image")  # fmt: skip


if __name__ == "__main__":
    main()

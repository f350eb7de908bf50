"""CLIP as a guide (:mod:`fguide.models.clip`) with a tiny random ``CLIPModel`` built here.

Parity: the head's logits equal CLIP's own ``logits_per_image`` on the PIL processor's
``pixel_values``; its preprocessing matches the processor's; its guidance gradient equals
float64 autograd through an independent preprocessing and transformers' own feature
functions. End to end: DDPM with a tiny ADM UNet guided by the head records a CLIP-score curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tolerances
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fguide  # noqa: E402
from fguide.diagnostics import TrajectoryRecorder  # noqa: E402
from fguide.models.clip import (  # noqa: E402
    CLIP_TEMPLATE,
    CLIPHead,
    CLIPScoreRecorder,
    load_clip_head,
    read_prompt_file,
    resize_output_size,
)
from fguide.models.imagenet_classes import IMAGENET_CLASSNAMES  # noqa: E402
from fguide.models.presets import create_model  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a photo of a cat.", "a hot dog", "a photo of the sea at night"]
SIZE = 16
F32, F64 = torch.float32, torch.float64


def _depth(head: torch.nn.Module) -> int:
    """Rounding stages of the head's forward pass (its image and text towers)."""
    return tolerances.network_depth(head)


def _unwrap(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is the
    projected embedding (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _build_clip_folder(folder: Path) -> Path:
    """A tiny random CLIP with a byte-level BPE tokenizer (CLIP's layout, a few merges), its
    safetensors weights, and a preprocessor config, saved as a transformers model folder."""
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in alphabet:
            vocab[c + suffix] = len(vocab)
    merges = ["h o", "p ho", "a t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    n = len(vocab)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            image_size=SIZE,
            patch_size=4,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": SIZE},
        "crop_size": {"height": SIZE, "width": SIZE},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": MEAN,
        "image_std": STD,
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def head(clip_dir: Path) -> CLIPHead:
    return load_clip_head(clip_dir, PROMPTS)


def _reference_model(folder: Path) -> Any:
    return transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()


def _processor(folder: Path) -> Any:
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)


def _uint8_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth photographs-like images: a random 4×4 field in [40, 215] interpolated bilinearly
    to h×w, plus mild noise. (PIL's uint8 resampling clamps each separable pass to [0, 255];
    on high-contrast noise that clamped overshoot, not the filter, dominates any comparison.)"""
    g = np.random.default_rng(seed)
    base = g.uniform(40, 215, (n, 4, 4, 3))
    r = np.linspace(0, 3, h)
    c = np.linspace(0, 3, w)
    r0, c0 = np.minimum(r.astype(int), 2), np.minimum(c.astype(int), 2)
    fr, fc = (r - r0)[:, None, None], (c - c0)[None, :, None]
    img = np.stack(
        [
            (1 - fr) * ((1 - fc) * b[r0][:, c0] + fc * b[r0][:, c0 + 1])
            + fr * ((1 - fc) * b[r0 + 1][:, c0] + fc * b[r0 + 1][:, c0 + 1])
            for b in base
        ]
    )
    img = img + g.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _to_model_range(u8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → x ∈ [−1, 1] NCHW (ADM's sample convention, inverted)."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 127.5 - 1


# -- parity with transformers -----------------------------------------------------------------


def test_logits_equal_clip_logits_per_image(clip_dir: Path, head: CLIPHead) -> None:
    """At the model's native size nothing is resampled, so the processor's pixel_values and the
    head's differ only by float rounding ((u/127.5 − 1 + 1)/2 vs u · (1/255)): 1e-5 on logits
    of magnitude ~10 in float32."""
    from PIL import Image

    u8 = _uint8_images(3, SIZE, SIZE, seed=0)
    proc = _processor(clip_dir)
    pix = proc(images=[Image.fromarray(a) for a in u8], return_tensors="pt")["pixel_values"]
    tok = transformers.CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    text = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = _reference_model(clip_dir)(pixel_values=pix, **text).logits_per_image
        ours = head(_to_model_range(u8).float())
    assert ours.shape == (3, len(PROMPTS))
    # (x + 1)/2, then (· − mean)/std: a few roundings; then two float32 networks
    tolerances.assert_close(head.pixel_values(_to_model_range(u8).float()), pix, F32, depth=4)
    tolerances.assert_close(ours, ref, F32, _depth(head))
    with torch.no_grad():
        scale = float(_reference_model(clip_dir).logit_scale.exp())
    tolerances.assert_close(head.logit_scale, scale, F32, depth=1)


@pytest.mark.parametrize("hw", [(24, 24), (10, 10), (20, 12), (13, 29)])
def test_preprocessing_matches_the_pil_processor(clip_dir: Path, head: CLIPHead, hw: tuple) -> None:
    """Shrink, enlarge, and non-square (resize by the shortest side, then centre crop).

    PIL resamples the uint8 image with fixed-point weights, rounds to a grey level and clamps
    the bicubic overshoot; the head does neither. So the pixel_values agree to within 1.5 grey
    levels (1.5/255/std in normalised units) everywhere and to well under one level on average.
    A different filter (bilinear, or torch's a = −0.75 bicubic without antialiasing), a shifted
    crop or swapped mean/std exceed both bounds.
    """
    from PIL import Image

    u8 = _uint8_images(2, *hw, seed=1)
    pix = _processor(clip_dir)(images=[Image.fromarray(a) for a in u8], return_tensors="pt")[
        "pixel_values"
    ].double()
    ours = head.pixel_values(_to_model_range(u8)).double()
    assert ours.shape == pix.shape == (2, 3, SIZE, SIZE)
    grey = (ours - pix).abs() * torch.tensor(STD, dtype=torch.float64)[:, None, None] * 255
    assert float(grey.max()) < 1.5, float(grey.max())
    assert float(grey.mean()) < 0.35, float(grey.mean())


@pytest.mark.parametrize(
    "hw,out", [((24, 24), (16, 16)), ((10, 10), (16, 16)), ((12, 20), (16, 26))]
)
def test_resize_filter_is_pils_bicubic(hw: tuple, out: tuple) -> None:
    """On float images (PIL mode "F": no rounding, no clamping) the head's resize is PIL's
    bicubic exactly, shrinking (antialiased) and enlarging: to float32 precision."""
    from PIL import Image

    from fguide.models.clip import CLIPPreprocess, clip_preprocess

    a = np.random.default_rng(6).uniform(0, 1, hw).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize(out[::-1], Image.Resampling.BICUBIC))
    cfg = CLIPPreprocess(
        size=min(out), crop_height=out[0], crop_width=out[1], mean=(0.0,) * 3, std=(1.0,) * 3
    )
    x = torch.from_numpy(a).double()[None, None].expand(1, 3, *hw) * 2 - 1
    # PIL sums in float32 over the filter's taps (4 per axis, times the shrink factor), rows
    # then columns
    taps = 4 * max(1, -(-max(hw) // min(out)))
    tolerances.assert_close(clip_preprocess(x, cfg)[0, 0], ref, F32, depth=2 * taps)


def test_resize_output_size_is_transformers_rule() -> None:
    from transformers.image_transforms import get_resize_output_image_size

    for h, w in [(24, 24), (10, 10), (20, 12), (13, 29), (257, 256), (7, 100)]:
        img = np.zeros((3, h, w), dtype=np.uint8)
        ref = get_resize_output_image_size(
            img, size=16, default_to_square=False, input_data_format="channels_first"
        )
        assert resize_output_size(h, w, 16) == tuple(ref)


def test_preprocessor_config_forms(tmp_path: Path) -> None:
    """The old int form (OpenAI's ViT-L/14-336 folder: size 336, crop_size 336) and the dict
    form read the same; without a file, CLIP's defaults at the tower's size."""
    from fguide.models.clip import CLIPPreprocess

    old = {"size": 336, "crop_size": 336, "resample": 3, "image_mean": MEAN, "image_std": STD}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    pre = CLIPPreprocess.from_folder(tmp_path, 224)
    assert (pre.size, pre.crop_height, pre.crop_width, pre.resample) == (336, 336, 336, "bicubic")
    assert pre.mean == tuple(MEAN) and pre.std == tuple(STD)
    new = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**new, "resample": 2}))
    assert CLIPPreprocess.from_folder(tmp_path, 336).resample == "bilinear"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**new, "resample": 1}))
    with pytest.raises(ValueError, match="resample 1 is not supported"):
        CLIPPreprocess.from_folder(tmp_path, 224)
    (tmp_path / "preprocessor_config.json").unlink()
    assert CLIPPreprocess.from_folder(tmp_path, 224) == CLIPPreprocess(224, 224, 224)


# -- gradients --------------------------------------------------------------------------------


def _independent_logits(clip_dir: Path, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """f = s · cos written out independently: bicubic-antialiased resize to 16×16 from the known
    geometry, centre crop by explicit offsets, the config's mean/std, and transformers' own
    get_image_features / get_text_features, all in float64."""
    model = _reference_model(clip_dir).double()
    v = (x + 1) / 2
    h, w = x.shape[-2:]
    if min(h, w) != SIZE:
        new = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
        v = F.interpolate(v, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (v.shape[-2] - SIZE) // 2, (v.shape[-1] - SIZE) // 2
    v = v[:, :, top : top + SIZE, left : left + SIZE]
    pix = (v - torch.tensor(MEAN, dtype=v.dtype)[:, None, None]) / torch.tensor(STD, dtype=v.dtype)[
        :, None, None
    ]
    tok = transformers.CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    text = tok(prompts, padding=True, return_tensors="pt")
    img = _unwrap(model.get_image_features(pixel_values=pix))
    txt = _unwrap(model.get_text_features(**text))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * img @ txt.T


@pytest.mark.parametrize("method", ["base", "js", "entropy", "tilted"])
@pytest.mark.parametrize("hw", [(12, 12), (20, 18)])
def test_guidance_gradient_matches_float64_autograd(
    clip_dir: Path, head: CLIPHead, method: str, hw: tuple
) -> None:
    """fguide.guidance_gradient(head, ...) (closed-form ∂S/∂f, one VJP through the head) equals
    autograd of the objective's score through the independent path, in float64."""
    head64 = load_clip_head(clip_dir, PROMPTS, dtype=torch.float64)
    obj = fguide.objective(method)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, *hw, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 2, 1, 2])
    grad = fguide.guidance_gradient(head64, x, y, obj, progress=0.3)
    xr = x.clone().requires_grad_(True)
    logits = _independent_logits(clip_dir, xr, PROMPTS)
    score = obj.tilted_score(logits, y, 0.3) if method == "tilted" else obj.score(logits, y, 0.3)
    (ref,) = torch.autograd.grad(score.sum(), xr)
    assert grad.dtype == torch.float64 and float(ref.abs().max()) > 0
    tolerances.assert_close(grad, ref, F64, 2 * _depth(head64))  # forward and back


def test_single_prompt_is_similarity_guidance(clip_dir: Path) -> None:
    """One prompt: S = (τ1 − τ2) · s · cos, and the regularisers vanish (softmax over one class
    is 1), so entropy/JS give the base gradient."""
    head1 = load_clip_head(clip_dir, "a photo of a cat.", dtype=torch.float64)
    assert head1.num_classes == 1
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x * 2 - 1
    y = torch.zeros(3, dtype=torch.long)
    xr = x.clone().requires_grad_(True)
    cos = _independent_logits(clip_dir, xr, ["a photo of a cat."])[:, 0] / head1.logit_scale
    (dcos,) = torch.autograd.grad(cos.sum(), xr)
    s = head1.logit_scale
    depth = 2 * _depth(head1)  # forward and back
    for tau2, factor in ((0.0, 1.0), (0.5, 0.5)):
        g = fguide.guidance_gradient(head1, x, y, fguide.objective("base", tau2=tau2))
        tolerances.assert_close(g, factor * s * dcos, F64, depth)
    base = fguide.guidance_gradient(head1, x, y, fguide.objective("base"))
    for method in ("entropy", "js", "rkl", "hellinger"):
        g = fguide.guidance_gradient(head1, x, y, fguide.objective(method))
        tolerances.assert_close(g, base, F64, depth, msg=method)


# -- prompts, ImageNet classes, errors --------------------------------------------------------


def test_zero_shot_over_prompts_and_prompt_file(
    clip_dir: Path, head: CLIPHead, tmp_path: Path
) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text(
        "# my prompts\n\n  a photo of a cat.  \na hot dog\n# skip\na photo of the sea at night\n"
    )
    assert read_prompt_file(file) == PROMPTS
    from_file = load_clip_head(clip_dir, prompt_file=file)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        out = from_file(x)
        assert out.shape == (5, 3)
        assert torch.equal(out, head(x))  # the same prompts: the same computation
        # Each column is that prompt's own one-prompt head: prompts do not interact.
        single = load_clip_head(clip_dir, PROMPTS[1])(x)
    # the text features computed in a batch of 3 prompts or alone: float32 rounding
    tolerances.assert_close(out[:, 1:2], single, F32, _depth(head))
    assert head.target_index(2) == 2 and head.target_index("a hot dog") == 1
    assert head.target_index("1") == 1


def test_imagenet_classes_as_prompts(clip_dir: Path) -> None:
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert IMAGENET_CLASSNAMES[0] == "tench" and IMAGENET_CLASSNAMES[1] == "goldfish"
    assert (
        IMAGENET_CLASSNAMES[207] == "Golden Retriever"
        and IMAGENET_CLASSNAMES[999] == "toilet paper"
    )
    head_in = load_clip_head(clip_dir, imagenet=True)
    assert head_in.num_classes == 1000
    assert head_in.prompts[0] == CLIP_TEMPLATE.format("tench") == "a photo of a tench."
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        out = head_in(x)
        ref = load_clip_head(clip_dir, [head_in.prompts[k] for k in (1, 207)])(x)
    assert out.shape == (2, 1000)
    tolerances.assert_close(out[:, [1, 207]], ref, F32, _depth(head_in))
    other = load_clip_head(clip_dir, imagenet=True, template="a drawing of a {}")
    assert other.prompts[999] == "a drawing of a toilet paper"


def test_clear_errors(clip_dir: Path, head: CLIPHead, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CLIP model folder not found"):
        load_clip_head(tmp_path / "nope", PROMPTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_head(empty, PROMPTS)
    (empty / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_clip_head(empty, PROMPTS)
    (empty / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_clip_head(empty, PROMPTS)
    with pytest.raises(ValueError, match="exactly one source of prompts"):
        load_clip_head(clip_dir)
    with pytest.raises(ValueError, match="exactly one source of prompts"):
        load_clip_head(clip_dir, PROMPTS, imagenet=True)
    with pytest.raises(ValueError, match="empty"):
        load_clip_head(clip_dir, ["a cat", "  "])
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_clip_head(clip_dir, prompt_file=blank)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_clip_head(clip_dir, prompt_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="template"):
        load_clip_head(clip_dir, imagenet=True, template="a photo")
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        head.target_index(3)
    with pytest.raises(ValueError, match="not one of the 3 prompts"):
        head.target_index("a photo of a dog.")
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fguide.guidance_gradient(head, x, torch.tensor([0, 3]), fguide.objective("base"))
    bad = tmp_path / "badcrop"
    bad.mkdir()
    for f in clip_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 12, "width": 12}
    (bad / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="16x16 input"):
        load_clip_head(bad, PROMPTS)


# -- CLIP score along a sampling trajectory ---------------------------------------------------


def _tiny_adm() -> fguide.denoisers.ADMModel:
    from fguide.denoisers import ADMModel

    torch.manual_seed(0)
    net = create_model(
        image_size=8,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="4",
        num_head_channels=32,
        class_cond=False,
        learn_sigma=True,
    ).eval()
    return ADMModel(net)


class _KeepX0:
    def __init__(self) -> None:
        self.x0: dict[int, torch.Tensor] = {}

    def __call__(self, rec: Any) -> None:
        self.x0[rec.step] = rec.x0.detach().clone()


def _run(head: CLIPHead, n: int, seed0: int, *callbacks: Any, scale: float = 30.0) -> torch.Tensor:
    proc = fguide.make_process("linear", 1000, "4")
    noise = fguide.SampleNoise(seed=0, indices=range(seed0, seed0 + n))
    guide = fguide.ClassifierGuide(head, fguide.objective("base", tau2=0.0), scale=scale)
    labels = torch.tensor([0, 1, 2, 1, 0, 2][seed0 : seed0 + n])
    with torch.no_grad():
        return fguide.ddpm(
            _tiny_adm(),
            noise.initial((3, 8, 8)),
            proc,
            labels=labels,
            guide=guide,
            noise=noise,
            callback=lambda rec: [cb(rec) for cb in callbacks],
        )


def test_ddpm_guided_by_clip_records_a_clip_score_curve(clip_dir: Path, head: CLIPHead) -> None:
    labels = torch.tensor([0, 1, 2, 1])
    clip_rec, traj, kept = CLIPScoreRecorder(head), TrajectoryRecorder(), _KeepX0()
    free = CLIPScoreRecorder(head, from_guidance=True)
    _run(head, 4, 0, clip_rec, traj, kept, free)
    curves = clip_rec.curves()
    depth = _depth(head)
    assert curves["step"] == [0.0, 1.0, 2.0, 3.0]
    # Guidance on s·cos raises the similarity: unguided, the final cosine stays near −0.38.
    unguided = CLIPScoreRecorder(head, labels)
    _run(head, 4, 0, unguided, scale=0.0)
    assert curves["clip_cosine"][-1] > unguided.curves()["clip_cosine"][-1] + 0.2
    assert curves["clip_cosine"][-1] > curves["clip_cosine"][0]
    # At the last step some samples have cos > 0 and some cos < 0: the clamp is exercised.
    assert curves["clip_score"][-1] > max(0.0, 100 * curves["clip_cosine"][-1]) + 0.1
    # Expected values from x̂0 through transformers' own features (not the head).
    for k, x0 in kept.x0.items():
        with torch.no_grad():
            cos = _independent_logits(clip_dir, x0.double(), PROMPTS) / head.logit_scale
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        # the float32 head against float64 features; cosines ≤ 1, scores ≤ 100
        tolerances.assert_close(curves["clip_cosine"][k], cos_y.mean(), F32, depth, scale=1.0)
        score = float((100 * cos_y.clamp_min(0)).mean())
        tolerances.assert_close(curves["clip_score"][k], score, F32, depth, scale=100.0)
    # The guide is this head on x̂0, so the free reading from the guidance logits agrees.
    for key, scale in (("clip_score", 100.0), ("clip_cosine", 1.0)):
        tolerances.assert_close(free.curves()[key], curves[key], F32, depth, scale=scale)
    # Merged batches (2 + 2) give the one-batch curve; the state round-trips beside the
    # trajectory recorder's, and the curve lands in trajectory.json's dict.
    a, b = CLIPScoreRecorder(head), CLIPScoreRecorder(head)
    _run(head, 2, 0, a)
    _run(head, 2, 2, b)
    state = {**TrajectoryRecorder().state(), **a.state()}
    merged = CLIPScoreRecorder.from_state(state)
    merged.merge(CLIPScoreRecorder.from_state(b.state()))
    for key, scale in (("clip_score", 100.0), ("clip_cosine", 1.0)):
        tolerances.assert_close(merged.curves()[key], curves[key], F32, depth, scale=scale)
    data = clip_rec.add_to(traj.to_dict())
    assert data["curves"]["clip_score"] == curves["clip_score"]
    assert data["summary"]["final_clip_score"] == curves["clip_score"][-1]
    assert len(data["curves"]["clip_score"]) == len(data["curves"]["step"])
    json.dumps(data)  # serialisable as trajectory.json


def test_fguide_sample_with_a_clip_guide_writes_a_clip_score_curve(
    clip_dir: Path, tmp_path: Path
) -> None:
    # The whole command: tiny unconditional ADM model, tiny CLIP, two prompts, target 1.
    from fguide.cli.main import main
    from fguide.models.presets import create_model

    flags = (
        "image_size=16 num_channels=32 num_res_blocks=1 channel_mult=1,2 "
        "attention_resolutions=8 num_head_channels=32 learn_sigma=True"
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "uncond.pt"
    torch.save(create_model(**dict(kv.split("=") for kv in flags.split())).state_dict(), ckpt)
    out = tmp_path / "run"
    argv = [
        "sample", "--out", str(out), "--model", str(ckpt), "--model-flags", flags,
        "--guide", f"clip:{clip_dir}", "--prompt", "a photo of a cat",
        "--prompt", "a photo of a dog", "--target", "a photo of a dog", "--tau2", "0",
        "--scale", "30", "--steps", "3", "--num-samples", "3", "--batch-size", "2",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 16, 16, 3) and z["arr_1"].tolist() == [1, 1, 1]
    traj = json.loads((out / "trajectory.json").read_text())
    scores = traj["curves"]["clip_score"]
    assert len(scores) == 3 and all(s is not None and 0.0 <= s <= 100.0 for s in scores)
    manifest = json.loads((out / "manifest.json").read_text())
    described = manifest["identity"]["resolved"]["classifier"]
    assert described["kind"] == "clip" and described["num_prompts"] == 2
    assert main(argv) == 0  # resumes as a complete run: same identity
    # fguide calibration draws the CLIP-score curve (EluCD Figure 7) beside Figure 1
    report = tmp_path / "calibration"
    assert main(["calibration", "--trajectory", str(out), "--out", str(report)]) == 0
    assert (report / "clip_score_vs_step.png").stat().st_size > 0
    runs = json.loads((report / "calibration.json").read_text())["runs"]
    assert runs[0]["curves"]["clip_score"] == scores

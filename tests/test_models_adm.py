"""ADM UNet / EncoderUNet: reference parity, official layouts, flags, dtypes and safe loading."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import tolerances
import torch
from fixture_utils import (
    assert_close_float32,
    assert_close_float64,
    case_names,
    fixture_state_dict,
    get_case,
    load_fixture,
)
from tolerances import network_depth

from fguide.models.adm import (
    EncoderUNetModel,
    UNetModel,
    qkv_attention,
    timestep_embedding,
)
from fguide.models.loading import (
    UnsafeCheckpointError,
    load_model,
    load_state_dict_file,
    matching_presets,
)
from fguide.models.presets import (
    PRESETS,
    UnknownPresetError,
    build_preset,
    classifier_constructor_kwargs,
    create_classifier,
    create_model,
    model_constructor_kwargs,
    parse_flag_string,
    preset_info,
    preset_state_dict_shapes,
    split_flags,
)

UNET = "adm_unet_forward.pt"
CLS = "adm_classifier_forward.pt"
KEYS = "official_state_dict_keys.json"
ADM_KINDS = ("diffusion", "classifier")
# The 512×512 presets are not in the fixtures: tests/test_models_presets.py checks them against
# guided-diffusion's own key lists (tests/reference/adm512_state_dict_keys.json).
FIXTURE_PRESETS = sorted(n for n in PRESETS if not n.startswith("512x512"))


def _check_layout(model: torch.nn.Module, shapes: list) -> None:
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k, list(s)) for k, s in shapes]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- reference parity ------------------------------------------------------------------------


@pytest.mark.parametrize("name", case_names(UNET))
def test_unet_matches_reference(name: str) -> None:
    """Built from the constructor: float64 parity; built by create_model: float32 parity."""
    case = get_case(UNET, name)
    assert model_constructor_kwargs(**case["create_model_kwargs"]) == case["constructor_kwargs"]
    model = UNetModel(**case["constructor_kwargs"]).double()
    created = create_model(**case["create_model_kwargs"]).double()
    weights = fixture_state_dict(model, case["seed"])
    for m in (model, created):
        _check_layout(m, case["state_dict_shapes"])
        assert sum(p.numel() for p in m.parameters()) == case["num_params"]
        m.load_state_dict(weights)
        m.eval()
    x, t, y = case["x"], case["t"], case["y"]
    depth = network_depth(model)
    with torch.no_grad():
        assert_close_float64(model(x, t, y), case["expected"], depth)
        out32 = created.float()(x.float(), t, y)
    assert_close_float32(out32, case["expected"], depth)


@pytest.mark.parametrize("name", case_names(CLS))
def test_classifier_matches_reference(name: str) -> None:
    """Logits and d/dx sum log p(y|x, t): float64 (constructor build), float32 (flags build)."""
    case = get_case(CLS, name)
    flags = case["classifier_flags"]
    assert classifier_constructor_kwargs(**flags) == case["constructor_kwargs"]
    if case["create_classifier_kwargs"] is not None:
        # The plain create_classifier flags (no extras) give the same network.
        kwargs = classifier_constructor_kwargs(**case["create_classifier_kwargs"])
        assert kwargs == case["constructor_kwargs"]
    model = EncoderUNetModel(**case["constructor_kwargs"]).double()
    created = create_classifier(**flags).double()
    weights = fixture_state_dict(model, case["seed"])
    for m in (model, created):
        _check_layout(m, case["state_dict_shapes"])
        assert sum(p.numel() for p in m.parameters()) == case["num_params"]
        m.load_state_dict(weights)
        m.eval()
    x, t, y = case["x"], case["t"], case["y"]
    xg = x.clone().requires_grad_(True)
    logits = model(xg, t)
    depth = network_depth(model)  # the gradient runs the graph back: twice the stages
    assert_close_float64(logits.detach(), case["expected_logits"], depth)
    log_prob = torch.log_softmax(logits, dim=-1)[torch.arange(len(y)), y].sum()
    (grad,) = torch.autograd.grad(log_prob, xg)
    assert_close_float64(grad, case["expected_grad_log_prob_y"], 2 * depth)
    with torch.no_grad():
        assert_close_float32(created.float()(x.float(), t), case["expected_logits"], depth)


# -- official presets --------------------------------------------------------------------------


def _official_adm() -> dict:
    return {n: p for n, p in load_fixture(KEYS)["presets"].items() if p["kind"] in ADM_KINDS}


def test_presets_cover_every_official_adm_checkpoint() -> None:
    assert set(FIXTURE_PRESETS) == set(_official_adm())


@pytest.mark.parametrize("name", FIXTURE_PRESETS)
def test_preset_matches_official_layout(name: str) -> None:
    official = _official_adm().get(name)
    if official is None:
        pytest.fail(f"preset {name} is not in {KEYS}")
    info = preset_info(name)
    assert info.kind == official["kind"]
    assert dict(info.flags) == official["flags"]
    assert info.constructor_kwargs() == official["constructor_kwargs"]
    assert info.diffusion_flags == official.get("diffusion_flags")
    assert info.readme_classifier_scale == official.get("readme_classifier_scale")
    assert info.url.endswith(f"/{name}.pt")

    model = build_preset(name, device="meta")
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert keys == [(k, list(s)) for k, s in official["keys"].items()]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]
    assert matching_presets(official["keys"]) == [name]

    # The README's flag string, parsed as the sampling script does, resolves to the same flags.
    parsed = parse_flag_string(official["readme_flags"])
    groups = split_flags(parsed)
    if info.kind == "diffusion":
        assert groups["model"] == official["flags"]
        assert groups["diffusion"] == official["diffusion_flags"]
    else:
        assert groups["classifier"] == official["flags"]
        assert classifier_constructor_kwargs(**parsed) == official["constructor_kwargs"]
    full = parse_flag_string(official["readme_flags_full"])
    expected_kwargs = official["constructor_kwargs"]
    if info.kind == "diffusion":
        assert model_constructor_kwargs(**full) == expected_kwargs
    else:
        assert classifier_constructor_kwargs(**full) == expected_kwargs


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(UnknownPresetError) as info:
        build_preset("1024x1024_diffusion")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(KeyError):
        load_model("nope", {})


def test_flag_parsing_and_errors() -> None:
    assert parse_flag_string("--a 1 --channel_mult --b=x") == {
        "a": "1",
        "channel_mult": "",
        "b": "x",
    }
    kwargs = model_constructor_kwargs(
        image_size="64",
        num_channels="32",
        class_cond="True",
        learn_sigma="false",
        attention_resolutions="32,16",
        channel_mult="",
    )
    assert kwargs["image_size"] == 64 and kwargs["model_channels"] == 32
    assert kwargs["num_classes"] == 1000 and kwargs["out_channels"] == 3
    assert kwargs["attention_resolutions"] == [2, 4]
    assert kwargs["channel_mult"] == [1, 2, 3, 4]
    with pytest.raises(TypeError, match="valid flags"):
        create_model(num_chanels=64)
    with pytest.raises(ValueError, match="channel_mult"):
        create_model(image_size=32)
    with pytest.raises(ValueError, match="class_cond"):
        create_model(class_cond="maybe")


# -- pieces --------------------------------------------------------------------------------------


def _einsum_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """The reference's explicit form: q, k scaled by ch^-1/4, softmax in >= float32."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.to(torch.promote_types(weight.dtype, torch.float32)), dim=-1)
    return torch.einsum("bts,bcs->bct", weight.to(v.dtype), v).reshape(b, -1, length)


def _max_logit(qkv: torch.Tensor, heads: int, legacy: bool) -> float:
    """max |qᵀk| / sqrt(ch) over heads and positions, split as :func:`_einsum_attention`."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, _ = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, _ = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    return float(torch.einsum("bct,bcs->bts", q, k).abs().max()) / math.sqrt(ch)


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_attention_equals_explicit_form(legacy: bool) -> None:
    g = torch.Generator().manual_seed(7)
    heads, ch, length = 3, 16, 37
    qkv = 2 * torch.randn(2, 3 * heads * ch, length, generator=g, dtype=torch.float64)
    ours = qkv_attention(qkv, heads, legacy)
    ref = _einsum_attention(qkv, heads, legacy)
    # q·k over 16 channels, a softmax over 37 positions, the weighted sum over 37 values; a
    # logit L rounds on its own scale, which the softmax passes on to the output as |L|·|v|
    depth = ch + 2 * length
    scale = tolerances.magnitude(ref) + _max_logit(qkv, heads, legacy) * float(qkv.abs().max())
    tolerances.assert_close(ours, ref, torch.float64, depth, scale=scale)
    # The two layouts really differ, so a swapped order could not pass.
    swapped = _einsum_attention(qkv, heads, not legacy)
    assert (ours - swapped).abs().max() > tolerances.tol(ref, torch.float64, depth, scale=scale)
    for dtype in (torch.float16, torch.bfloat16):
        low = qkv_attention(qkv.to(dtype), heads, legacy)
        assert low.dtype == dtype
        tolerances.assert_close(low, ref, dtype, depth, scale=scale, msg=str(dtype))


def test_timestep_embedding_cos_first_and_odd_dim() -> None:
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 7, dtype=torch.float64)
    assert emb.shape == (3, 7) and emb.dtype == torch.float64
    freqs = torch.exp(-math.log(10000) * torch.arange(3, dtype=torch.float64) / 3)
    args = t.double()[:, None] * freqs
    # the arguments t·ω round on their own scale (up to 999): cos and sin inherit that
    scale = float(args.max())
    tolerances.assert_close(emb[:, :3], torch.cos(args), torch.float64, depth=3, scale=scale)
    tolerances.assert_close(emb[:, 3:6], torch.sin(args), torch.float64, depth=3, scale=scale)
    assert torch.all(emb[:, 6] == 0)
    # Reduced precision requests still build the embedding in float32.
    assert timestep_embedding(t, 8, dtype=torch.float16).dtype == torch.float32


def _tiny_unet() -> UNetModel:
    model = create_model(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16,8",
        class_cond=True,
        learn_sigma=True,
        num_heads=2,
        resblock_updown=True,
        use_scale_shift_norm=True,
    )
    # Fixture-style weights: the reference's zero-initialised output convs would hide errors.
    model.load_state_dict({k: v.float() for k, v in fixture_state_dict(model, 11).items()})
    return model.eval()


def test_forward_arguments_are_checked() -> None:
    model = _tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, torch.tensor([5, 5]), y)
        torch.testing.assert_close(model(x, 5, y), out, rtol=0, atol=0)
        assert out.shape == (2, 6, 16, 16)
        with pytest.raises(ValueError, match="class-conditional"):
            model(x, torch.tensor([5, 5]))
    clf = _tiny_classifier(0)
    with pytest.raises(ValueError, match="image_size"):
        clf(torch.zeros(1, 3, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_close_to_float32(dtype: torch.dtype) -> None:
    """Both dtype schemes (torso conversion as in the reference, whole-model cast) stay close."""
    model = _tiny_unet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 999])
    with torch.no_grad():
        ref = model(x, t, y)
        torso = copy.deepcopy(model)
        torso.convert_torso(dtype)
        assert torso.dtype == dtype
        assert torso.time_embed[0].weight.dtype == torch.float32  # not converted
        assert torso.out[2].weight.dtype == torch.float32
        out_torso = torso(x, t, y)
        whole = copy.deepcopy(model).to(dtype)
        out_whole = whole(x.to(dtype), t, y)
    assert out_torso.dtype == torch.float32 and out_whole.dtype == dtype
    tol = 5e-3 if dtype == torch.float16 else 4e-2
    for out in (out_torso, out_whole):
        assert torch.isfinite(out).all()
        assert _rel_err(out, ref) < tol
    fp16 = copy.deepcopy(model)
    fp16.convert_to_fp16()
    assert fp16.dtype == torch.float16
    fp16.convert_to_fp32()
    assert fp16.dtype == torch.float32


# -- loading ------------------------------------------------------------------------------------


class _Custom:
    """A pickled object that weights-only loading must refuse."""


def _tiny_classifier(seed: int, out_channels: int = 10) -> EncoderUNetModel:
    model = create_classifier(
        image_size=16,
        classifier_width=32,
        classifier_depth=1,
        classifier_attention_resolutions="8",
        channel_mult="1,2",
        num_head_channels=32,
        out_channels=out_channels,
    )
    model.load_state_dict({k: v.float() for k, v in fixture_state_dict(model, seed).items()})
    return model.eval()


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match="only loads plain state dicts") as info:
        load_state_dict_file(path)
    assert "_Custom" in str(info.value)  # torch's reason is kept
    assert "weights_only=False" in str(info.value)  # and how to convert
    torch.save(_tiny_classifier(0), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(UnsafeCheckpointError):
        load_model(_tiny_classifier(0), tmp_path / "module.pt")
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_state_dict_file(missing)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(tmp_path / "wrapped.pt")


def test_round_trip_and_module_prefix(tmp_path: Path) -> None:
    src = _tiny_classifier(1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 500])
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    with torch.no_grad():
        ref = src(x, t)
        for file in ("plain.pt", "ddp.pt"):
            dst = load_model(_tiny_classifier(2), tmp_path / file)
            assert not dst.training
            torch.testing.assert_close(dst(x, t), ref, rtol=0, atol=0)


def test_mismatch_lists_keys(tmp_path: Path) -> None:
    sd = _tiny_classifier(1).state_dict()
    del sd["time_embed.0.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["out.2.c_proj.bias"] = torch.zeros(7)  # 10 classes expected
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        load_model(_tiny_classifier(0), tmp_path / "bad.pt")
    msg = str(info.value)
    assert "missing (1): time_embed.0.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "wrong shape (1): out.2.c_proj.bias: file [7] vs model [10]" in msg
    assert "No official ADM preset" in msg


def test_mismatch_names_the_preset_that_fits(tmp_path: Path) -> None:
    # A file with the 64x64 classifier's layout, stored as meta tensors (no data, tiny file).
    layout = preset_state_dict_shapes("64x64_classifier")
    torch.save({k: torch.empty(s, device="meta") for k, s in layout.items()}, tmp_path / "m.pt")
    for target in ("128x128_classifier", _tiny_classifier(0)):
        with pytest.raises(ValueError, match="'64x64_classifier'") as info:
            load_model(target, tmp_path / "m.pt")
        assert "missing (" in str(info.value) or "wrong shape (" in str(info.value)


def test_preset_load_assigns_the_files_tensors() -> None:
    # Half-precision zeros with the 128x128 classifier's layout: loaded without a random init,
    # cast to float32, on the CPU.
    layout = preset_state_dict_shapes("128x128_classifier")
    sd = {k: torch.zeros(s, dtype=torch.float16) for k, s in layout.items()}
    model = load_model("128x128_classifier", sd)
    assert isinstance(model, EncoderUNetModel) and not model.training
    params = dict(model.named_parameters())
    assert set(params) == set(layout)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    assert all(p.requires_grad for p in params.values())
    assert float(params["out.2.c_proj.weight"].detach().abs().sum()) == 0.0


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_hands_sdpa_contiguous_inputs(
    legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-contiguous q, k, v send SDPA to its slow math kernel on CPU (issue 11)."""
    from fguide.models import adm

    seen: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append(all(z.is_contiguous() for z in (q, k, v)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(adm.F, "scaled_dot_product_attention", recording)
    qkv = torch.randn(2, 3 * 2 * 8, 16)
    out = adm.qkv_attention(qkv, 2, legacy)
    assert seen == [True] and out.shape == (2, 16, 16)

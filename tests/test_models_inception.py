"""FID Inception-v3: parity with torch-fidelity / TF (fixtures), TF1 resize, weight loading."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import tolerances
import torch
from fixture_utils import (
    assert_close_float32,
    assert_close_float64,
    case_names,
    fixture_init,
    get_case,
    load_fixture,
)
from tolerances import network_depth

from fguide.models.inception import (
    INCEPTION_WEIGHTS_ENV,
    FIDInception,
    InceptionOutputs,
    fid_inception_key_mapping,
    load_fid_inception,
    tf1_resize_bilinear,
)

FIXTURE = "inception_features.pt"
# InceptionOutputs field -> the fixture's expected key.
OUTPUTS = {
    "pool": "pool_2048",
    "logits": "logits_unbiased_1008",
    "spatial": "spatial_2023",
    "feat_64": "feat_64",
    "feat_192": "feat_192",
    "feat_768": "feat_768",
}


def _fixture_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Fixture-init weights over torch-fidelity's keys (float64, num_batches_tracked = 0)."""
    mapping = load_fixture(FIXTURE)["key_mapping"]
    return {
        m["torch_fidelity"]: fixture_init(m["torch_fidelity"], tuple(m["shape"]), seed)
        for m in mapping
    }


@functools.lru_cache(maxsize=1)
def _models(seed: int) -> tuple[FIDInception, FIDInception]:
    """The float64 model and the float32 one obtained by casting it."""
    model64 = FIDInception().double()
    model64.load_state_dict(_fixture_state_dict(seed))
    model64.eval()
    return model64, copy.deepcopy(model64).float()


def _depth() -> int:
    """Stages up to the deepest output (an upper bound for the earlier ones)."""
    return network_depth(FIDInception())


@functools.cache
def _outputs(name: str, dtype: torch.dtype) -> InceptionOutputs:
    # Each forward costs ~1 s on two threads: run it once per case and dtype.
    case = get_case(FIXTURE, name)
    model64, model32 = _models(case["config"]["seed"])
    model = model64 if dtype == torch.float64 else model32
    with torch.no_grad():
        return model(case["images_nhwc_uint8"])


def test_state_dict_names_are_torch_fidelity_names() -> None:
    mapping = load_fixture(FIXTURE)["key_mapping"]
    got = [(k, list(v.shape)) for k, v in FIDInception().state_dict().items()]
    assert got == [(m["torch_fidelity"], list(m["shape"])) for m in mapping]
    assert all(m["torch_fidelity"] == m["pytorch_fid_pt_inception"] for m in mapping)


def test_key_mapping_matches_pytorch_fid_wrapper() -> None:
    mapping = load_fixture(FIXTURE)["key_mapping"]
    ours = fid_inception_key_mapping()
    for m in mapping:
        assert ours[m["pytorch_fid_pt_inception"]] == m["torch_fidelity"]
        if m["pytorch_fid_wrapper"] is not None:
            assert ours[m["pytorch_fid_wrapper"]] == m["torch_fidelity"]
    wrapper_keys = {m["pytorch_fid_wrapper"] for m in mapping} - {None}
    assert set(ours) == {m["torch_fidelity"] for m in mapping} | wrapper_keys


@pytest.mark.parametrize("name", case_names(FIXTURE))
def test_float64_outputs_match_reference(name: str) -> None:
    case = get_case(FIXTURE, name)
    out = _outputs(name, torch.float64)
    for field, key in OUTPUTS.items():
        got, expected = getattr(out, field), case[key]
        assert got.dtype == torch.float64 and got.shape == expected.shape, field
        assert_close_float64(got, expected, _depth(), field)


@pytest.mark.parametrize("name", case_names(FIXTURE))
def test_float32_outputs_match_reference(name: str) -> None:
    case = get_case(FIXTURE, name)
    out = _outputs(name, torch.float32)
    for field, key in OUTPUTS.items():
        got = getattr(out, field)
        assert_close_float32(got, case[key], _depth(), field)


@pytest.mark.parametrize("name", case_names(FIXTURE))
def test_tf1_resize_rows(name: str) -> None:
    case = get_case(FIXTURE, name)
    rows = case["config"]["resized_rows"]
    images = case["images_nhwc_uint8"].permute(0, 3, 1, 2)
    r64 = tf1_resize_bilinear(images.double())[:, :, rows].permute(0, 2, 3, 1)
    # two interpolations in sequence (rows, then columns)
    tolerances.assert_close(r64, case["resized_rows_nhwc"], torch.float64, depth=2)
    r32 = tf1_resize_bilinear(images.float())[:, :, rows].permute(0, 2, 3, 1)
    assert torch.equal(r32, case["resized_rows_nhwc_tf_float32"])  # bit-identical to TF


def test_tf1_resize_by_hand() -> None:
    """2 -> 4 per axis: scale 0.5, src = 0, 0.5, 1, 1.5; hi clamps to the last pixel."""
    x = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    expected = torch.tensor(
        [[0.0, 2.0, 4.0, 4.0], [4.0, 6.0, 8.0, 8.0]] + [[8.0, 10.0, 12.0, 12.0]] * 2
    )
    assert torch.equal(tf1_resize_bilinear(x, (4, 4))[0, 0], expected)
    # No half-pixel centres: downsampling 4 -> 2 picks pixels 0 and 2 exactly.
    down = tf1_resize_bilinear(expected[None, None], (2, 2))[0, 0]
    assert torch.equal(down, torch.tensor([[0.0, 4.0], [8.0, 12.0]]))
    with pytest.raises(ValueError, match="float32 or float64"):
        tf1_resize_bilinear(x.half())


def test_input_layouts() -> None:
    model = FIDInception()
    images = torch.randint(0, 256, (2, 40, 56, 3), dtype=torch.uint8)
    nhwc = model.prepare(images)
    nchw = model.prepare(images.permute(0, 3, 1, 2).float())
    assert nhwc.shape == (2, 3, 299, 299) and nhwc.is_contiguous()
    assert torch.equal(nhwc, nchw)
    with pytest.raises(ValueError, match="NHWC"):
        model.prepare(images.permute(0, 3, 1, 2).contiguous())  # uint8 NCHW
    with pytest.raises(ValueError, match="NCHW"):
        model.prepare(images.float())  # float NHWC


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    sd = _fixture_state_dict(seed=3)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _assert_loaded(model: FIDInception, weights: dict[str, torch.Tensor]) -> None:
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("naming", ["torch_fidelity", "pytorch_fid_pt_inception"])
def test_load_either_public_naming(naming: str, weights: dict, tmp_path: Path) -> None:
    mapping = load_fixture(FIXTURE)["key_mapping"]
    renamed = {m[naming]: weights[m["torch_fidelity"]] for m in mapping}
    path = tmp_path / f"{naming}.pth"
    torch.save(renamed, path)
    _assert_loaded(load_fid_inception(path), weights)
    model64 = load_fid_inception(str(path), dtype=torch.float64)
    assert model64.fc.weight.dtype == torch.float64


def test_load_pytorch_fid_wrapper_naming(weights: dict, tmp_path: Path) -> None:
    mapping = load_fixture(FIXTURE)["key_mapping"]
    # pytorch-fid's wrapper has no fc; old files may also lack num_batches_tracked.
    renamed = {
        m["pytorch_fid_wrapper"]: weights[m["torch_fidelity"]]
        for m in mapping
        if m["pytorch_fid_wrapper"] and not m["torch_fidelity"].endswith("num_batches_tracked")
    }
    path = tmp_path / "wrapper.pth"
    torch.save(renamed, path)
    with pytest.raises(ValueError, match="require_logits=False"):
        load_fid_inception(path)
    model = load_fid_inception(path, require_logits=False)
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, weights[k]), k
    assert torch.isnan(model.fc.weight).all()


def test_load_from_environment(
    weights: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(weights, path)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    _assert_loaded(load_fid_inception(), weights)


def test_missing_weights_say_what_and_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    for call in (lambda: load_fid_inception(), lambda: load_fid_inception(tmp_path / "no.pth")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in msg
        assert "weights-inception-2015-12-05-6726825d.pth" in msg
        assert "github.com/mseitzer/pytorch-fid/releases" in msg
        assert "github.com/toshas/torch-fidelity/releases" in msg
        assert INCEPTION_WEIGHTS_ENV in msg


def test_wrong_file_is_rejected(weights: dict, tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({**weights, "AuxLogits.fc.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="unexpected.*AuxLogits"):
        load_fid_inception(path)


def test_non_finite_weights_are_an_error_not_a_missing_fc(weights: dict, tmp_path: Path) -> None:
    # NaN logits mean "this file has no fc" (no Inception Score); an fc holding inf is a damaged
    # file and must say so instead (issue 10).
    path = tmp_path / "inf.pth"
    torch.save({**weights, "fc.bias": torch.full_like(weights["fc.bias"], float("inf"))}, path)
    with pytest.raises(ValueError, match=r"non-finite values in \['fc.bias'\]"):
        load_fid_inception(path)

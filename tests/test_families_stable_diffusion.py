"""The Stable Diffusion family end to end through ``fguide sample`` (families/stable_diffusion.py):
tiny random SD and SDXL folders (tests/sd_folders.py), 2–3 steps, unguided and guided by a CLIP
head (the generation prompts, labels i mod n), an image classifier and a scalar reward; a run
interrupted after a shard and resumed equals an uninterrupted one byte for byte; a changed
prompt, negative prompt or reward head is refused on resume; bad input ends in one line (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_folders import build_clip_folder, build_sd_folder, build_sdxl_folder, one_thread  # noqa: E402

from fguide.cli.main import main  # noqa: E402
from fguide.io.files import sha256_file  # noqa: E402
from fguide.io.images import to_uint8_nhwc  # noqa: E402
from fguide.rng import SampleNoise  # noqa: E402
from fguide.sampling import SampleConfig, resolve_config  # noqa: E402
from fguide.sampling.configs import apply_paper_config  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
PROMPTS = ["a red fox", "hot dog at sea"]


def decoded_classifier() -> nn.Module:
    """A 3-class classifier of 32×32 images in [−1, 1] (an import-spec guide)."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdcli")
    clip = build_clip_folder(root / "clip", projection=16)
    torch.manual_seed(6)
    head = root / "aesthetic.pth"
    layers = {"layers.0.weight": torch.randn(4, 16), "layers.0.bias": torch.randn(4)}
    torch.save(
        {**layers, "layers.2.weight": torch.randn(1, 4), "layers.2.bias": torch.zeros(1)}, head
    )
    return {
        "sd": build_sd_folder(root / "sd"),
        "sdxl": build_sdxl_folder(root / "sdxl"),
        "clip": clip,
        "head": head,
    }


def _argv(model: Path, out: Path, *extra: str, n: int = 3) -> list[str]:
    """``fguide sample`` on the two prompts, 3 steps; unguided unless ``extra`` names a guide."""
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    if "--guide" not in extra:
        extra = ("--method", "none", *extra)
    return [
        "sample", "--model", str(model), "--out", str(out), *prompts, "--steps", "3",
        "--num-samples", str(n), "--batch-size", "2", "--shard-size", "2", "--device", "cpu",
        "--no-progress", "--grid", "0", *extra,
    ]  # fmt: skip


def _samples(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unguided_run_is_the_pipeline_on_prompt_i_mod_n(
    kind: str, inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Every sample equals the SD sampler run directly on its prompt (i mod n), with CFG on
    the default negative conditioning and the family's default sampler, steps and CFG scale."""
    from fguide.models.stable_diffusion import build_sd_sampling, load_sd_pipeline

    out = tmp_path / "run"
    assert main(_argv(inputs[kind], out)) == 0
    got = _samples(out)
    assert list(got) == ["arr_0"] and got["arr_0"].shape == (3, 32, 32, 3)  # no labels
    identity = json.loads((out / "manifest.json").read_text())["identity"]
    cfg = {"sd": 7.5, "sdxl": 5.0}[kind]
    assert (identity["sampler"], identity["steps"], identity["cfg_scale"]) == ("dpmpp-2m", "3", cfg)
    assert identity["prompts"] == PROMPTS and "negative_prompt" not in identity

    sd = load_sd_pipeline(inputs[kind])
    emb = sd.encode(PROMPTS)
    for ids in ([0, 1], [2]):
        s = build_sd_sampling(
            sd, sd.conditioning(emb, ids), sampler="dpmpp-2m", steps=3, cfg_scale=cfg,
            negative=sd.negative(None, emb),
        )  # fmt: skip
        noise = SampleNoise(0, ids)
        with torch.no_grad():
            x = s.to_image(s.sample(noise.initial(sd.state_shape), noise=noise))
        np.testing.assert_array_equal(got["arr_0"][ids], to_uint8_nhwc(x))


def test_clip_guide_scores_the_generation_prompts(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The CLIP head's classes are the generation prompts, sample i's label is i mod n, the
    guidance moves the samples, and the CLIP score is recorded per step from the guidance."""
    clip = ["--guide", f"clip:{inputs['clip']}", "--scale", "200", "--sampler", "ddim"]
    base = _argv(inputs["sd"], tmp_path / "plain", "--sampler", "ddim", n=4)
    assert main(base) == 0
    assert main(_argv(inputs["sd"], tmp_path / "clip", *clip, n=4)) == 0
    guided = _samples(tmp_path / "clip")
    np.testing.assert_array_equal(guided["arr_1"], [0, 1, 0, 1])
    assert not np.array_equal(guided["arr_0"], _samples(tmp_path / "plain")["arr_0"])
    identity = json.loads((tmp_path / "clip" / "manifest.json").read_text())["identity"]
    assert identity["resolved"]["classifier"]["prompts"] == PROMPTS
    curves = json.loads((tmp_path / "clip" / "trajectory.json").read_text())["curves"]
    assert len(curves["clip_cosine"]) == 3 and all(-1 <= c <= 1 for c in curves["clip_cosine"])
    assert all(g > 0 for g in curves["grad_norm"])


def test_image_size_sets_the_generated_size(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--image-size is what SD generates (the tiny VAE's factor is 4: 24 px from 6×6 latents,
    SDXL's time ids follow); a size the VAE cannot make is refused."""
    assert main(_argv(inputs["sdxl"], tmp_path / "run", "--image-size", "24", n=1)) == 0
    assert _samples(tmp_path / "run")["arr_0"].shape == (1, 24, 24, 3)
    line = _one_line_error(capsys, _argv(inputs["sd"], tmp_path / "bad", "--image-size", "30"))
    assert "--image-size must be a positive multiple of 4" in line


def test_statistics_from_the_guidance_equal_those_of_the_decoded_x0(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A CLIP guide of scale 0 records its statistics from its own logits (free); an unguided
    run with the same head decodes x̂0 at every step instead: the same samples, so the same
    per-step CLIP cosine and confidence, up to float32 rounding of one decoder + CLIP pass."""
    clip = ["--guide", f"clip:{inputs['clip']}", "--sampler", "ddim"]
    assert main(_argv(inputs["sd"], tmp_path / "free", *clip, "--scale", "0", n=2)) == 0
    assert main(_argv(inputs["sd"], tmp_path / "decoded", *clip, "--method", "none", n=2)) == 0
    free, decoded = (
        json.loads((tmp_path / run / "trajectory.json").read_text())["curves"]
        for run in ("free", "decoded")
    )
    for curve in ("clip_cosine", "confidence_mean"):
        assert len(free[curve]) == len(decoded[curve]) == 3
        np.testing.assert_allclose(free[curve], decoded[curve], rtol=0, atol=1e-6)


def test_guide_prompts_replace_the_generation_prompts(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    argv = _argv(
        inputs["sd"], tmp_path / "run", "--guide", f"clip:{inputs['clip']}", "--scale", "1",
        "--guide-prompt", "a cat", "--guide-prompt", "a dog", "--guide-prompt", "a hat", n=2,
    )  # fmt: skip
    assert main(argv) == 0
    identity = json.loads((tmp_path / "run" / "manifest.json").read_text())["identity"]
    assert identity["resolved"]["classifier"]["prompts"] == ["a cat", "a dog", "a hat"]
    assert identity["prompts"] == PROMPTS
    np.testing.assert_array_equal(_samples(tmp_path / "run")["arr_1"], [0, 1])


def test_classifier_guide_sees_the_decoded_image(inputs: dict[str, Path], tmp_path: Path) -> None:
    spec = "test_families_stable_diffusion:decoded_classifier"
    argv = _argv(inputs["sdxl"], tmp_path / "run", "--guide", spec, "--scale", "30",
                 "--target", "2", "--sampler", "ddpm", n=2)  # fmt: skip
    assert main(argv) == 0
    assert main(_argv(inputs["sdxl"], tmp_path / "plain", "--sampler", "ddpm", n=2)) == 0
    got = _samples(tmp_path / "run")
    np.testing.assert_array_equal(got["arr_1"], [2, 2])
    assert not np.array_equal(got["arr_0"], _samples(tmp_path / "plain")["arr_0"])


def test_reward_guide_records_the_reward(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"reward:{inputs['clip']}:{inputs['head']}"
    argv = _argv(inputs["sd"], tmp_path / "run", "--guide", spec, "--scale", "5", n=2)
    assert main(argv) == 0
    data = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert len(data["curves"]["reward"]) == 3 and "reward_definition" in data
    identity = json.loads((tmp_path / "run" / "manifest.json").read_text())["identity"]
    assert identity["resolved"]["classifier"]["head_sha256"] == sha256_file(inputs["head"])
    np.testing.assert_array_equal(_samples(tmp_path / "run")["arr_1"], [0, 0])
    report = ["calibration", "--trajectory", str(tmp_path / "run"), "--out", str(tmp_path / "c")]
    assert main(report) == 0
    assert (tmp_path / "c" / "reward_vs_step.png").is_file()  # drawn from its definition
    js = _argv(inputs["sd"], tmp_path / "js", "--guide", spec, "--scale", "5", "--method", "js")
    line = _one_line_error(capsys, js)
    assert "--method" in line and "'js' does not apply to a scalar reward guide" in line


def test_interrupted_run_resumes_to_the_same_bytes(inputs: dict[str, Path], tmp_path: Path) -> None:
    clip = ["--guide", f"clip:{inputs['clip']}", "--scale", "100"]
    assert main(_argv(inputs["sd"], tmp_path / "whole", *clip, n=4)) == 0
    part = _argv(inputs["sd"], tmp_path / "part", *clip, n=4)
    assert main([*part, "--max-shards", "1"]) == 0
    assert not (tmp_path / "part" / "samples.npz").exists()
    assert main(part) == 0
    for name in ("samples.npz", "trajectory.json"):
        whole = (tmp_path / "whole" / name).read_bytes()
        assert (tmp_path / "part" / name).read_bytes() == whole, name
    # a sample does not depend on its batch (the statistics' float sums may round otherwise)
    assert main(_argv(inputs["sd"], tmp_path / "b1", *clip, "--batch-size", "1", n=4)) == 0
    whole = (tmp_path / "whole" / "samples.npz").read_bytes()
    assert (tmp_path / "b1" / "samples.npz").read_bytes() == whole


def test_killed_run_resumes_to_the_same_bytes(inputs: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL once the first shard is on disk, rerun the same command: the samples and the
    trajectory equal an uninterrupted run's byte for byte."""
    import signal
    import subprocess
    import sys
    import time

    from test_sampling_run import subprocess_env

    clip = ["--guide", f"clip:{inputs['clip']}", "--scale", "100"]
    argv = _argv(inputs["sd"], tmp_path / "killed", *clip, "--shard-size", "1", n=6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fguide.cli.main", *argv],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = tmp_path / "killed" / "shards"
    try:
        deadline = time.time() + 180
        while not list(shards.glob("*.json")) and proc.poll() is None:
            assert time.time() < deadline, "the sampling process wrote no shard"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert 1 <= len(list(shards.glob("*.json"))) < 6  # killed part-way
    assert main(argv) == 0
    assert main(_argv(inputs["sd"], tmp_path / "whole", *clip, "--shard-size", "1", n=6)) == 0
    for name in ("samples.npz", "trajectory.json"):
        whole = (tmp_path / "whole" / name).read_bytes()
        assert (tmp_path / "killed" / name).read_bytes() == whole, name


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (["--prompt", "another"], "prompts"),
        (["--negative-prompt", ""], "negative_prompt"),
        (["--cfg-scale", "3"], "cfg_scale"),
    ],
)
def test_a_changed_setting_on_resume_is_refused(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    what: str,
) -> None:
    argv = _argv(inputs["sdxl"], tmp_path / "run", n=2)
    assert main([*argv, "--max-shards", "1"]) == 0
    line = _one_line_error(capsys, [*argv, *change])
    assert what in line, line


def test_a_changed_reward_head_is_refused_on_resume(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = tmp_path / "head.pth"
    head.write_bytes(inputs["head"].read_bytes())
    argv = _argv(inputs["sd"], tmp_path / "run", "--guide", f"reward:{inputs['clip']}:{head}",
                 "--scale", "1", "--steps", "2", n=2)  # fmt: skip
    assert main(argv) == 0
    sd = torch.load(head, weights_only=True)
    sd["layers.2.bias"] += 1.0
    torch.save(sd, head)
    assert "head_sha256" in _one_line_error(capsys, argv)


def _bad(inputs: dict[str, Path], tmp: Path, prompts: Any) -> list[tuple[list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("# nothing\n\n")
    sd = str(inputs["sd"])
    # a check that fails to refuse must not start a long run
    common = ["--out", str(tmp / "bad"), "--device", "cpu", "--no-progress", "--num-samples", "1"]
    none = ["--method", "none"]
    return [
        (["sample", "--model", sd, *none, *common], "--prompt"),
        (["sample", "--model", sd, "--prompt-file", str(empty), *none, *common], "has no prompts"),
        (["sample", "--model", sd, *prompts, "--steps", "ddim25", *none, *common], "--steps"),
        (["sample", "--model", sd, *prompts, "--sampler", "heun", *none, *common], "--sampler"),
        (["sample", "--model", sd, *prompts, "--guide-prompt", "x", *none, *common],
         "--guide-prompt"),
        (["sample", "--model", sd, *prompts, "--guide", f"clip:{inputs['clip']}", *common],
         "--scale"),
        (["sample", "--model", sd, *prompts, "--guide", "test_families_stable_diffusion:"
          "decoded_classifier", "--scale", "1", "--target", "cat", *common], "--target"),
        (["sample", "--model", sd, *prompts, "--cfg-channels", "3", *none, *common],
         "--cfg-channels"),
        (["sample", "--model", sd, *prompts, "--guide", f"clip:{inputs['clip']}", "--scale",
          "1", "--guidance-method", "dps", *common], "--guidance-method 'dps'"),
    ]  # fmt: skip


def test_bad_input_is_one_line(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, needle in _bad(inputs, tmp_path, ["--prompt", "a fox"]):
        line = _one_line_error(capsys, argv)
        assert needle in line, (argv, line)
    assert not (tmp_path / "bad").exists()


def test_dpmpp_2m_is_refused_for_other_families(tmp_path: Path) -> None:
    from fguide.params import ParamError

    config = SampleConfig(out=tmp_path / "o", model=tmp_path / "m.pt", sampler="dpmpp-2m")
    with pytest.raises(ParamError, match="'dpmpp-2m' does not apply to adm models") as err:
        resolve_config(config)
    assert err.value.params[0] == "sampler"


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("sd15", "sd", ("dpmpp-2m", "50", 7.5, 512, None)),
        ("sd15-ddim", "sd", ("ddim", "50", 7.5, 512, 0.0)),
        ("sdxl", "sdxl", ("dpmpp-2m", "50", 5.0, 1024, None)),
    ],
)
def test_named_configurations(
    name: str, kind: str, expected: tuple[Any, ...], inputs: dict[str, Path], tmp_path: Path
) -> None:
    settings = apply_paper_config(name, {"prompts": ("a fox",)})
    c = resolve_config(SampleConfig(out=tmp_path / "o", model=inputs[kind], **settings))
    assert (c.sampler, c.steps, c.cfg_scale, c.image_size, c.eta) == expected
    assert c.method == "none"
    guided = {"prompts": ("a fox",), "method": "base", "classifier": f"clip:{inputs['clip']}"}
    g = resolve_config(
        SampleConfig(
            out=tmp_path / "o", model=inputs[kind], **apply_paper_config(name, guided), scale=2.0
        )  # fmt: skip
    )
    assert (g.tau1, g.tau2, g.scale) == (1.0, 0.0, 2.0)  # cosine guidance, γ the user's


def test_evaluate_clip_scores_a_run_against_its_generation_prompts(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """``fguide evaluate RUN --clip`` on a real SD run reads the run's prompts from its manifest
    (sample i against prompt i mod n) and equals the metric on the run's images, per prompt."""
    from fguide.metrics.clip_score import clip_score
    from fguide.models.clip_reward import load_clip_score_model

    run = tmp_path / "run"
    assert main(_argv(inputs["sd"], run)) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--clip", str(inputs["clip"]), "--out", str(out)]) == 0
    clip = json.loads((out / "metrics.json").read_text())["clip"]
    assert clip["prompts_source"] == "the run's manifest"
    images = _samples(run)["arr_0"]
    model = load_clip_score_model(inputs["clip"])
    assert [e["prompt"] for e in clip["per_prompt"]] == PROMPTS
    for k, entry in enumerate(clip["per_prompt"]):
        group = images[np.arange(len(images)) % len(PROMPTS) == k]
        assert entry["images"] == len(group)
        want = clip_score(*model, group, [PROMPTS[k]]).score
        # float32 towers on batches of other sizes; 100 · a mean of cosines of unit vectors
        assert abs(entry["clip_score"] - want) <= 100 * 64 * float(torch.finfo(torch.float32).eps)

"""``fguide calibration``: Figure 1 from a sampling run's trajectory.json, and a classifier's
ECE / Smooth ECE / reliability on clean and forward-noised labelled images."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_close, tol

from fguide.cli.main import main
from fguide.diagnostics import TrajectoryRecorder
from fguide.evaluation.calibration import parse_noise_levels
from fguide.guidance import ClassifierGuide
from fguide.io.images import from_uint8_nhwc
from fguide.metrics import confidence_and_correct, ece, reliability_diagram, smooth_ece_loss
from fguide.metrics.calibration import reliability_from_confidences
from fguide.objectives import objective
from fguide.samplers import SampleNoise, ddpm
from fguide.schedules import make_process
from fguide.worlds.gmm import BayesClassifier, ExactEpsModel, GaussianMixture

F64 = torch.float64


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# -- trajectory mode ------------------------------------------------------------------------


def _gmm_run(folder: Path, guided: bool) -> TrajectoryRecorder:
    """A tiny DDPM run in the Gaussian-mixture world with a TrajectoryRecorder, saved the way a
    sampling run saves its diagnostics (folder/trajectory.json)."""
    mixture = GaussianMixture.circle(num_classes=4, dim=2)
    process = make_process("linear", 1000, "12", variance_type="fixed_small")
    full = make_process("linear", 1000, "")
    model = ExactEpsModel(mixture, full["alphas_cumprod"])
    classifier = BayesClassifier(mixture, sharpness=8.0)
    labels = torch.arange(4).repeat(8)
    guide = ClassifierGuide(classifier, objective("base"), scale=0.5) if guided else None
    # Unguided runs measure the classifier on x̂0 themselves (no guidance logits to reuse).
    rec = TrajectoryRecorder() if guided else TrajectoryRecorder(labels, classifier)
    z = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddpm(model, z, process, labels=labels, guide=guide, callback=rec, clip_denoised=False)
    rec.save(folder / "trajectory.json")
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trajectory")
    (root / "guided").mkdir()
    (root / "unguided").mkdir()
    return {
        "root": root,
        "guided": _gmm_run(root / "guided", guided=True),
        "unguided": _gmm_run(root / "unguided", guided=False),
    }


def test_trajectory_figures_and_json(runs: dict[str, Any], tmp_path: Path) -> None:
    root, rec = runs["root"], runs["guided"]
    code, out, err = _cli(
        ["calibration", "--trajectory", str(root / "guided"), "--out", str(tmp_path)]
    )
    assert code == 0, err
    for name in ("ece_vs_step", "confidence_vs_step", "grad_norm_vs_step", "figure1"):
        w, h = _png_size(tmp_path / f"{name}.png")
        assert w > 300 and h > 200
    assert _png_size(tmp_path / "figure1.png")[0] > 2 * _png_size(tmp_path / "ece_vs_step.png")[0]
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["mode"] == "trajectory" and len(data["runs"]) == 1
    run = data["runs"][0]
    expected = json.loads(json.dumps(rec.curves()))  # the recorder's curves, JSON round trip
    for key in ("step", "confidence_mean", "confidence_top25", "grad_norm", "ece", "accuracy"):
        assert run["curves"][key] == expected[key], key
    assert run["num_steps"] == 12 and run["label"] == "guided"
    # the mean of 12 per-step ECEs (values ≤ 1), the JSON round trip exact
    assert_close(run["integral_ece"], rec.summary()["integral_ece"], F64, depth=12, scale=1.0)
    assert all(g is not None and g > 0 for g in run["curves"]["grad_norm"])
    assert data["figures"]["figure1"] == "figure1.png"
    assert "integral ECE" in out and "guided" in out


def test_trajectory_runs_overlay_with_labels(runs: dict[str, Any], tmp_path: Path) -> None:
    root = runs["root"]
    code, _, err = _cli(
        [
            "calibration",
            "--trajectory",
            str(root / "guided" / "trajectory.json"),
            str(root / "unguided"),
            "--labels",
            "EluCD",
            "none",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, err
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["EluCD", "none"]
    # The unguided run has no guidance gradient, but calibration of the classifier on x̂0.
    unguided = data["runs"][1]["curves"]
    assert all(g is None for g in unguided["grad_norm"])
    assert unguided["ece"] == json.loads(json.dumps(runs["unguided"].curves()["ece"]))
    assert (tmp_path / "grad_norm_vs_step.png").is_file()


def test_a_folder_holding_the_users_files_is_refused(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"calibration.json": "my numbers", "figure1.png": "my figure"}
    for name, text in mine.items():
        (out / name).write_text(text)
    code, _, err = _cli(
        ["calibration", "--trajectory", str(runs["root"] / "guided"), "--out", str(out)]
    )
    assert code == 2 and "(calibration.json, figure1.png)" in err and "--out" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == mine  # no lock or record added
    # Its own folder: a rerun overwrites what it wrote.
    for _ in range(2):
        code, _, err = _cli(
            [
                "calibration",
                "--trajectory",
                str(runs["root"] / "guided"),
                "--out",
                str(tmp_path / "own"),
            ]
        )
        assert code == 0, err


def test_trajectory_errors(runs: dict[str, Any], tmp_path: Path) -> None:
    code, _, err = _cli(["calibration", "--trajectory", str(tmp_path), "--out", str(tmp_path)])
    assert code == 2 and "no trajectory.json" in err
    bad = tmp_path / "bad.json"
    data = json.loads((runs["root"] / "guided" / "trajectory.json").read_text())
    del data["curves"]["ece"]
    bad.write_text(json.dumps(data))
    code, _, err = _cli(["calibration", "--trajectory", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "bad.json" in err and "'ece'" in err
    data["curves"]["ece"] = [0.1]  # one value for 12 steps
    bad.write_text(json.dumps(data))
    code, _, err = _cli(["calibration", "--trajectory", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "'curves.ece' must be a list of 12 values" in err
    code, _, err = _cli(
        ["calibration", "--trajectory", str(bad), "--labels", "a", "b", "--out", str(tmp_path)]
    )
    assert code == 2 and "--labels" in err


# -- classifier mode ------------------------------------------------------------------------

CLASSIFIER_MODULE = textwrap.dedent(
    """
    import torch

    class Tiny(torch.nn.Module):
        # Logits from channel means: a linear, deterministic, batch-independent classifier.
        def __init__(self, time_aware=False):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=torch.float64) * 6)
            self.time_aware = time_aware

        def forward(self, x, t=None):
            f = x.double().mean((2, 3)) @ self.w
            if t is not None:  # a noise-aware classifier: less sure at larger t
                f = f / (1 + t.double()[:, None] / 250)
            return f

    def make():
        return Tiny()

    def make_time_aware():
        return Tiny(time_aware=True)
    """
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("classifier")
    (root / "tiny_classifier_mod.py").write_text(CLASSIFIER_MODULE)
    rng = np.random.default_rng(0)
    n = 30
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    # Images carry a class-dependent tint, so the classifier is right more often than chance.
    labels = rng.integers(0, 5, n)
    images = np.clip(images.astype(int) // 2 + 25 * (labels[:, None, None, None] % 3), 0, 255)
    images = images.astype(np.uint8)
    np.savez(root / "val.npz", images, labels)
    return {"root": root, "images": images, "labels": labels}


@pytest.fixture()
def classifier_path(labelled: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(labelled["root"]))
    import tiny_classifier_mod  # type: ignore[import-not-found]

    return tiny_classifier_mod


def test_classifier_mode_matches_direct_ece(
    labelled: dict[str, Any], classifier_path: Any, tmp_path: Path
) -> None:
    code, out, err = _cli(
        [
            "calibration",
            "--classifier",
            "tiny_classifier_mod:make",
            str(labelled["root"] / "val.npz"),
            "--noise-t",
            "clean,0,500",
            "--batch-size",
            "7",
            "--seed",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0, err
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert [lv["t"] for lv in data["levels"]] == [None, 0, 500]
    assert data["time_aware"] is False
    net = classifier_path.make()
    x0 = from_uint8_nhwc(labelled["images"])
    y = torch.from_numpy(labelled["labels"])
    process = make_process("linear", 1000, "")
    eps = SampleNoise(3, range(len(y)))(x0)  # image i's noise: seed (3, i), any batch
    for lv in data["levels"]:
        if lv["t"] is None:
            x = x0
        else:
            x = process.q_sample(x0, torch.full((len(y),), lv["t"]), eps)
        with torch.no_grad():
            logits = net(x)
        # means over the images of softmaxes (values ≤ 1) of the same float32 logits
        depth = len(y) + logits.shape[1]
        assert_close(lv["ece"], ece(logits, y), F64, depth, scale=1.0)
        assert_close(lv["smooth_ece"], smooth_ece_loss(logits, y), F64, depth, scale=1.0)
        conf, correct = confidence_and_correct(logits, y)
        assert_close(lv["accuracy"], correct.mean(), F64, depth, scale=1.0)
        assert_close(lv["mean_confidence"], conf.mean(), F64, depth, scale=1.0)
        assert lv["reliability"]["count"] == reliability_diagram(logits, y).to_dict()["count"]
    assert data["levels"][0]["noise_std"] == 0.0
    # sqrt(1 − ᾱ_500), ᾱ a product of 501 factors
    std = float(np.sqrt(1 - process["alphas_cumprod"][500]))
    assert_close(data["levels"][2]["noise_std"], std, F64, depth=501 + 2)
    # Noise changes the answer: the clean and t = 500 levels differ.
    assert data["levels"][0]["ece"] != data["levels"][2]["ece"]
    for name in ("reliability_clean", "reliability_t0000", "reliability_t0500", "calibration_vs_t"):
        _png_size(tmp_path / f"{name}.png")
    assert "clean" in out and "ECE" in out


def test_time_aware_classifier_gets_the_timestep(
    labelled: dict[str, Any], classifier_path: Any, tmp_path: Path
) -> None:
    # The factory's module sets ``time_aware`` on the module: no flag needed.
    code, _, err = _cli(
        [
            "calibration",
            "--classifier",
            "tiny_classifier_mod:make_time_aware",
            str(labelled["root"] / "val.npz"),
            "--noise-t",
            "750",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0, err
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["time_aware"] is True
    net = classifier_path.make()
    x0 = from_uint8_nhwc(labelled["images"])
    y = torch.from_numpy(labelled["labels"])
    t = torch.full((len(y),), 750)
    x = make_process("linear", 1000, "").q_sample(x0, t, SampleNoise(0, range(len(y)))(x0))
    with torch.no_grad():
        with_t, without_t = net(x, t), net(x)
    depth = len(y) + with_t.shape[1]  # a mean of softmaxes (values ≤ 1)
    conf_t = confidence_and_correct(with_t, y)[0].mean()
    assert_close(data["levels"][0]["mean_confidence"], conf_t, F64, depth, scale=1.0)
    conf_no_t = confidence_and_correct(without_t, y)[0].mean()
    assert abs(data["levels"][0]["mean_confidence"] - conf_no_t) > tol(1.0, F64, depth)


def test_class_folders_equal_npz(
    labelled: dict[str, Any], classifier_path: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "val"
    for i, (im, y) in enumerate(zip(labelled["images"], labelled["labels"], strict=True)):
        (folder / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"class{y}" / f"{i:03d}.png")
    results = []
    for src in (folder, labelled["root"] / "val.npz"):
        out = tmp_path / f"out-{src.name}"  # not the image folder: it holds the user's images
        code, _, err = _cli(
            [
                "calibration",
                "--classifier",
                "tiny_classifier_mod:make",
                str(src),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert code == 0, err
        results.append(json.loads((out / "calibration.json").read_text())["levels"][0])
    n = results[0]["n"]
    assert results[1]["n"] == n
    for key in ("ece", "smooth_ece", "accuracy", "mean_confidence"):  # means of values ≤ 1
        assert_close(results[0][key], results[1][key], F64, depth=n, scale=1.0, msg=key)


def test_classifier_mode_errors(
    labelled: dict[str, Any], classifier_path: Any, tmp_path: Path
) -> None:
    root = labelled["root"]
    np.savez(root / "nolabels.npz", labelled["images"])
    cases = [
        (["tiny_classifier_mod:make", str(root / "nolabels.npz")], "no labels"),
        (["tiny_classifier_mod:make", str(root / "val.npz"), "--noise-t", "1000"], "outside"),
        (["tiny_classifier_mod:make", str(root / "val.npz"), "--noise-t", "x"], "'x'"),
        (["resnet50", str(root / "val.npz")], "needs --classifier-weights"),
        (["no_such_module_xyz:make", str(root / "val.npz")], "cannot import"),
        (["tiny_classifier_mod:nothing", str(root / "val.npz")], "no attribute"),
        (["tiny_classifier_mod:make"], "needs IMAGES"),
    ]
    for extra, needle in cases:
        code, _, err = _cli(["calibration", "--classifier", *extra, "--out", str(tmp_path)])
        assert code == 2 and needle in err, (extra, err)
    np.savez(root / "many.npz", labelled["images"], labelled["labels"] + 5)
    code, _, err = _cli(
        [
            "calibration",
            "--classifier",
            "tiny_classifier_mod:make",
            str(root / "many.npz"),
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2 and "5 classes" in err


def test_reliability_from_confidences_equals_reliability_diagram() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g, dtype=torch.float64) * 3
    logits[:5] = torch.tensor([0.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # ties, conf 1/7
    y = torch.randint(0, 7, (200,), generator=g)
    conf, correct = confidence_and_correct(logits, y)
    ours = reliability_from_confidences(conf, correct, 10).to_dict()
    assert ours == reliability_diagram(logits, y, 10).to_dict()


def test_parse_noise_levels() -> None:
    assert parse_noise_levels("clean, 0,250 ,500") == [None, 0, 250, 500]
    with pytest.raises(ValueError, match="repeated"):
        parse_noise_levels("0,0")
    with pytest.raises(ValueError, match="outside"):
        parse_noise_levels("-1")

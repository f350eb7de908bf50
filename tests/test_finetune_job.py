"""Smooth-ECE fine-tuning (fguide.finetune, ``fguide finetune``) on data the tests generate.

The calibration task: 10 classes of 8×8 RGB images, each a faint class template buried in
strong noise (held-out accuracy ≈ 0.25), classified by a linear model initialised at the
Bayes direction with its logits scaled by κ = 2.5 (deliberately overconfident: mean
confidence ≈ 0.4 against accuracy ≈ 0.25). Fine-tuning with CE alone and with CE + Smooth ECE
then runs the same steps on the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tolerances
import torch
from PIL import Image
from tolerances import network_depth
from torch import nn

from fguide.cli.main import main
from fguide.finetune import (
    ArraySource,
    FinetuneConfig,
    adm_x0_estimator,
    finetune,
    wrap_module,
)
from fguide.guides import LoadedClassifier, load_classifier
from fguide.models.loading import load_model
from fguide.models.presets import create_model
from fguide.models.resnet import load_resnet, resnet
from fguide.schedules import make_process


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: one thread avoids OpenMP barrier stalls on a busy machine
    # (measured 10x faster with other jobs running).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- data and models -----------------------------------------------------------------------------


def _task(
    seed: int, n: int, k: int = 10, amp: float = 0.04, noise: float = 0.8
) -> tuple[ArraySource, np.ndarray]:
    """Images x = clip(127.5 (1 + amp·μ_y + noise·z)) as uint8; returns the source and μ."""
    rng = np.random.default_rng(seed)
    tmpl = rng.standard_normal((k, 8, 8, 3))
    y = rng.integers(0, k, n)
    x = 127.5 * (1 + amp * tmpl[y] + noise * rng.standard_normal((n, 8, 8, 3)))
    return ArraySource(np.clip(x, 0, 255).astype(np.uint8), y), tmpl


def _overconfident_linear(tmpl: np.ndarray, kappa: float = 2.5, amp: float = 0.04) -> nn.Module:
    """κ × the Bayes logits μ_k·x/σ² − |μ_k|²/(2σ²) of the (unclipped) Gaussian task."""
    k = tmpl.shape[0]
    mu = amp * tmpl.transpose(0, 3, 1, 2).reshape(k, -1)  # NCHW flattening order
    s2 = 0.8**2
    net = nn.Sequential(nn.Flatten(), nn.Linear(mu.shape[1], k))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(kappa * mu / s2))
        net[1].bias.copy_(torch.tensor(-kappa * (mu**2).sum(1) / (2 * s2)))
    return net


_TINY_MODULE = """
import torch
from torch import nn
from fguide.models.presets import create_classifier


class Noisy(nn.Module):
    # A tiny ADM EncoderUNetModel (noise-aware) with dropout on its logits.
    def __init__(self, classes):
        super().__init__()
        self.net = create_classifier(
            image_size=8, classifier_width=32, classifier_depth=1,
            classifier_attention_resolutions="4", channel_mult="1,2",
            out_channels=classes, num_head_channels=32,
        )
        self.drop = nn.Dropout(0.2)

    def forward(self, x, t):
        return self.drop(self.net(x, t))


def noisy4():
    torch.manual_seed(0)
    return Noisy(4)


def linear3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
"""


@pytest.fixture
def module_file(tmp_path: Path) -> Path:
    path = tmp_path / "tinymods.py"
    path.write_text(textwrap.dedent(_TINY_MODULE))
    return path


def _load(spec: str, weights: Path | None = None) -> LoadedClassifier:
    """The one classifier loader, as ``fguide finetune`` calls it on 8x8 images."""
    aware = True if "noisy" in spec else None
    return load_classifier(spec, weights, image_size=8, time_aware=aware, require_weights=False)


def _linear3() -> nn.Module:
    """The same initial weights at every call (training changes a module in place)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 3))


def _small_images(seed: int, n: int, k: int) -> ArraySource:
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % k)


def _state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict)
    return sd


# -- the calibration effect ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_smooth_ece_term_lowers_ece_at_similar_accuracy(tmp_path: Path, seed: int) -> None:
    # Measured with this exact setting over seeds 0..9: ECE(λ=0) − ECE(λ=1) ∈ [0.012, 0.027]
    # (mean 0.021; seed 0: 0.116 vs 0.098, seed 1: 0.120 vs 0.095), accuracies within 0.013.
    results = {}
    for lam in (0.0, 1.0):
        source, tmpl = _task(seed, 12000)
        cfg = FinetuneConfig(
            iterations=200,
            batch_size=64,
            lr=1e-2,
            weight_decay=0.0,
            ece_weight=lam,
            augment=False,
            holdout=2000,
            seed=seed,
            workers=0,
            log_every=50,
            checkpoint_every=1000,
        )
        clf = wrap_module(_overconfident_linear(tmpl))
        results[lam] = finetune(clf, source, tmp_path / f"lam{lam}", cfg, progress=False).report
    before, plain, calibrated = results[0.0]["before"], results[0.0]["after"], results[1.0]["after"]
    assert results[1.0]["before"] == before  # same start, same held-out set
    assert before["mean_confidence"] > before["accuracy"] + 0.1  # overconfident to begin with
    assert calibrated["ece"] < plain["ece"] - 0.008
    assert calibrated["ece"] < before["ece"] - 0.05
    assert abs(calibrated["accuracy"] - plain["accuracy"]) < 0.03


# -- resume, micro-batching, files --------------------------------------------------------------


def test_resume_after_sigint_equals_uninterrupted_run(tmp_path: Path, module_file: Path) -> None:
    # Noise-aware ADM encoder (x_t, t), augmentation, micro-batches and dropout: every source
    # of randomness is in play.
    source = _small_images(3, 40, 4)
    cfg = FinetuneConfig(
        iterations=6,
        batch_size=8,
        microbatch=3,
        lr=1e-3,
        input="noisy",
        holdout=8,
        checkpoint_every=4,
        log_every=2,
        workers=2,
    )
    spec = f"{module_file}:noisy4"

    full = finetune(_load(spec), source, tmp_path / "full", cfg, progress=False)
    assert full.status == "completed" and full.step == 6

    def interrupt_at_3(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "resumed"
    first = finetune(_load(spec), source, out, cfg, progress=False, on_step=interrupt_at_3)
    assert first.status == "interrupted" and first.step == 3
    assert not (out / "model.pt").exists()
    assert _state(out / "checkpoint.pt")["step"] == 3
    second = finetune(_load(spec), source, out, cfg, progress=False)
    assert second.status == "completed" and second.report is not None
    assert second.report["training"]["steps_this_call"] == 3

    a, b = _state(full.model_path), _state(second.model_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _load(spec).module.state_dict()[k]) for k in a)
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(s).items() if k != "steps_per_s"}
        for s in p.read_text().splitlines()
    ]
    assert strip(out / "log.jsonl") == strip(tmp_path / "full" / "log.jsonl")
    assert second.report["before"] == full.report["before"]
    by_t = full.report["after"]["by_t"]  # ECE per quarter of the t range (noisy input)
    assert sum(b["n"] for b in by_t) == 8
    assert all(b["t_range"] in ([0, 249], [250, 499], [500, 749], [750, 999]) for b in by_t)

    # A crash (no checkpoint at the crash) resumes from the last periodic checkpoint (step 4).
    def crash_at_5(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise RuntimeError("simulated crash")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated"):
        finetune(_load(spec), source, crashed, cfg, progress=False, on_step=crash_at_5)
    assert _state(crashed / "checkpoint.pt")["step"] == 4
    resumed = finetune(_load(spec), source, crashed, cfg, progress=False)
    c = _state(resumed.model_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert strip(crashed / "log.jsonl") == strip(tmp_path / "full" / "log.jsonl")

    again = finetune(_load(spec), source, out, cfg, progress=False)
    assert again.status == "already_complete"
    with pytest.raises(ValueError, match="lr"):  # a different run's settings are refused
        finetune(_load(spec), source, out, dataclasses.replace(cfg, lr=1e-2))


def test_resnet_microbatched_run_matches_full_batch_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(resnet("resnet18", num_classes=4).state_dict(), weights)
    source = _small_images(5, 24, 4)
    runs = {}
    for micro in (None, 3):
        cfg = FinetuneConfig(
            iterations=2, batch_size=6, microbatch=micro, lr=1e-4, holdout=4, workers=0
        )
        clf = _load("resnet18", weights)
        runs[micro] = finetune(clf, source, tmp_path / f"m{micro}", cfg, progress=False)
    a, b = _state(runs[None].model_path), _state(runs[3].model_path)
    # Frozen batch norm: the micro-batched update is the full batch's up to the gradients'
    # rounding (each iteration runs the network forward and back) and the parameters' own,
    # on the parameters' scale.
    depth = cfg.iterations * 2 * network_depth(resnet("resnet18", num_classes=4))
    scale = max(tolerances.magnitude(v) for v in a.values() if v.is_floating_point())
    for k in a:
        tolerances.assert_close(b[k], a[k], torch.float32, depth, scale=scale, msg=k)
    loaded = load_resnet("resnet18", runs[3].model_path)  # the final file is a plain ResNet
    assert torch.equal(loaded.net.fc.weight, b["fc.weight"])
    assert not torch.equal(b["fc.weight"], _state(weights)["fc.weight"])
    assert torch.equal(b["bn1.running_mean"], _state(weights)["bn1.running_mean"])


def test_cli_end_to_end_outputs(tmp_path: Path, module_file: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 4)
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--classifier",
        f"{module_file}:noisy4",
        "--data",
        str(data),
        "--out",
        str(out),
        "--input",
        "noisy",
        "--iterations",
        "3",
        "--batch-size",
        "4",
        "--holdout",
        "0.2",
        "--log-every",
        "1",
        "--precision",
        "bf16",
        "--no-progress",
        "--workers",
        "0",
    ]
    assert main(argv) == 0
    assert "ECE" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["n_holdout"] == 6 and report["data"]["n_train"] == 24
    assert report["resolved"]["input"] == "noisy" and report["config"]["precision"] == "bf16"
    for key in ("ece", "accuracy", "nll", "smooth_ece", "reliability"):
        assert key in report["before"] and key in report["after"]
    assert report["provenance"]["torch_version"] == torch.__version__
    log = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite([r["ce"], r["smooth_ece"], r["ece"], r["accuracy"]]).all() for r in log)
    assert (out / "reliability_before.png").stat().st_size > 0
    # The final file: a plain state dict (weights_only) that fits the module it came from.
    sd = _state(out / "model.pt")
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("tinymods_check", module_file)
    assert spec is not None and spec.loader is not None
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    load_model(mod.noisy4(), out / "model.pt")
    assert main(argv) == 0  # the same command again: nothing left to do
    assert "already complete" in capsys.readouterr().out


# -- inputs ----------------------------------------------------------------


def test_denoised_input_feeds_the_estimate(tmp_path: Path) -> None:
    seen: list[float] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(192, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(float(x.abs().max()))
            return self.lin(x.flatten(1))

    calls = []

    def x0_hat(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((t.min().item() >= 0, t.max().item() < 1000, y.shape == t.shape))
        return torch.full_like(x_t, 0.25)

    cfg = FinetuneConfig(iterations=2, batch_size=4, input="denoised", holdout=3, workers=0)
    finetune(
        wrap_module(Probe()),
        _small_images(1, 12, 3),
        tmp_path,
        cfg,
        denoiser=x0_hat,
        progress=False,
    )
    assert seen and all(v == 0.25 for v in seen[1:])  # seen[0] is the blank shape probe
    assert calls and all(all(c) for c in calls)
    with pytest.raises(ValueError, match="denoiser"):
        finetune(wrap_module(Probe()), _small_images(1, 12, 3), tmp_path / "b", cfg)


def test_adm_x0_estimator_uses_eps_and_clips() -> None:
    unet = create_model(
        image_size=8,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="4",
        channel_mult="1,2",
        class_cond=True,
        learn_sigma=True,
        num_head_channels=32,
    )
    process = make_process("linear", 1000)
    x_t, t, y = 3 * torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        x0 = adm_x0_estimator(unet, process, class_cond=True)(x_t, t, y)
        eps = unet(x_t, t, y)[:, :3]
    assert x0.shape == x_t.shape and x0.abs().max() <= 1
    # the same network on the same input and the same formula: the same bits
    torch.testing.assert_close(x0, process.x0_from_eps(x_t, t, eps).clamp(-1, 1), rtol=0, atol=0)


# -- bad inputs ----------------------------------------------------------------------------------


def _cli(tmp_path: Path, data: Path, classifier: str, *extra: str) -> list[str]:
    return [
        "finetune",
        "--classifier",
        classifier,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--iterations",
        "2",
        "--batch-size",
        "2",
        "--holdout",
        "1",
        "--no-progress",
        "--workers",
        "0",
        *extra,
    ]


def _folder(root: Path, classes: int, per_class: int = 2) -> Path:
    for c in range(classes):
        (root / f"n{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((10, 12, 3), 40 * c + i, np.uint8)).save(
                root / f"n{c:02d}" / f"{i}.png"
            )
    return root


def test_bad_inputs_give_clear_errors(tmp_path: Path, module_file: Path, capsys) -> None:
    linear3 = f"{module_file}:linear3"

    def error(argv: list[str]) -> str:
        try:
            code = main(argv)
        except SystemExit as exit_info:  # a bad number is refused as the flags are parsed
            code = exit_info.code
        assert code == 2
        return capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in error(_cli(tmp_path, tmp_path / "empty", linear3))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    assert "no images" in error(_cli(tmp_path, tmp_path / "noimg", linear3))
    assert "not found" in error(_cli(tmp_path, tmp_path / "missing", linear3))

    four = _folder(tmp_path / "four", 4)
    msg = error(_cli(tmp_path, four, linear3, "--image-size", "8"))
    assert "4 class folders" in msg and "3 classes" in msg

    bad = _folder(tmp_path / "bad", 3)
    (bad / "n01" / "broken.png").write_bytes(b"not an image")
    msg = error(_cli(tmp_path, bad, linear3, "--image-size", "8", "--holdout", "3"))
    assert "broken.png" in msg and "cannot read image" in msg

    npz = tmp_path / "labels.npz"
    np.savez(npz, np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1, 2, 3, 1, 0]))
    assert "label 3" in error(_cli(tmp_path, npz, linear3))
    np.savez(tmp_path / "nolabels.npz", np.zeros((6, 8, 8, 3), np.uint8))
    assert "arr_1" in error(_cli(tmp_path, tmp_path / "nolabels.npz", linear3))

    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1, 2, 0, 1, 2]))
    assert "--batch-size" in error(_cli(tmp_path, good, linear3, "--batch-size", "0"))
    assert "lambda" in error(_cli(tmp_path, good, linear3, "--lambda", "-1"))
    assert "'resnet7' is none of" in error(_cli(tmp_path, good, "resnet7"))
    assert "no callable" in error(_cli(tmp_path, good, f"{module_file}:nothing"))
    assert "weights" in error(_cli(tmp_path, good, linear3, "--weights", str(tmp_path / "w.pt")))
    msg = error(_cli(tmp_path, good, "128x128_diffusion"))
    assert "'128x128_diffusion' is a diffusion model preset" in msg and "128x128_classifier" in msg
    msg = error(_cli(tmp_path, good, linear3, "--image-size", "16"))
    assert "[1, 3, 16, 16]" in msg and "image size" in msg
    assert "--denoiser" in error(_cli(tmp_path, good, linear3, "--input", "denoised"))
    msg = error(
        _cli(
            tmp_path,
            good,
            linear3,
            "--input",
            "denoised",
            "--denoiser",
            "128x128_classifier",
            "--denoiser-weights",
            str(good),
        )
    )
    assert "not an ADM diffusion preset" in msg


# -- the loss option, the data identity, the flags -----------------------------------------------


def test_resume_over_changed_image_content_is_refused(tmp_path: Path) -> None:
    # Same shape, same labels, one pixel different: a different run (issue 10, item 5).
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0, checkpoint_every=1)

    def linear() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 3))

    out = tmp_path / "run"
    finetune(wrap_module(linear()), ArraySource(images, labels), out, cfg, progress=False)
    changed = images.copy()
    changed[5, 1, 2, 0] ^= 1
    more = dataclasses.replace(cfg, iterations=2)
    with pytest.raises(ValueError, match="data.sha256"):
        finetune(wrap_module(linear()), ArraySource(changed, labels), out, more, progress=False)
    again = finetune(wrap_module(linear()), ArraySource(images, labels), out, more, progress=False)
    assert again.status == "completed" and again.step == 2


IMPORTED_GUIDE = """
import torch
from torch import nn

SHIFT = {shift}


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(192, 3)

    def forward(self, x):
        return self.lin(x.flatten(1)) + SHIFT  # a module constant read at every call


def make():
    return Guide()
"""


def test_resume_over_a_changed_import_spec_source_is_refused(tmp_path: Path) -> None:
    # Same initial weights, other code: the spec's module file is hashed into the identity
    # (as a sampling run's is), so the checkpoint is not continued with another forward.
    module = tmp_path / "ft_guide_module.py"
    source = _small_images(2, 12, 3)
    cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0)
    out = tmp_path / "run"
    more = dataclasses.replace(cfg, iterations=2)

    def run(shift: float, config: FinetuneConfig) -> object:
        module.write_text(IMPORTED_GUIDE.format(shift=shift))
        clf = load_classifier(f"{module}:make", image_size=8)
        return finetune(clf, source, out, config, progress=False)

    run(0.0, cfg)
    with pytest.raises(ValueError, match="source_sha256"):
        run(1.0, more)
    res = run(0.0, more)
    assert res.status == "completed" and res.step == 2  # type: ignore[attr-defined]


def test_resume_with_another_iteration_count_is_refused_when_the_lr_anneals(
    tmp_path: Path,
) -> None:
    # Annealed, step k's learning rate is lr·(1 − k/N): another N is another schedule, so the
    # checkpoint's identity holds N; without annealing a run may be extended.
    source = _small_images(2, 12, 3)

    def linear() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 3))

    for anneal in (True, False):
        cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0, anneal_lr=anneal)
        out = tmp_path / f"anneal{anneal}"
        finetune(wrap_module(linear()), source, out, cfg, progress=False)
        more = dataclasses.replace(cfg, iterations=2)
        if anneal:
            with pytest.raises(ValueError, match="config.iterations: checkpoint 1, now 2"):
                finetune(wrap_module(linear()), source, out, more, progress=False)
        else:
            res = finetune(wrap_module(linear()), source, out, more, progress=False)
            assert res.status == "completed" and res.step == 2


def test_cli_defaults_are_the_api_defaults_and_old_flags_still_work(capsys) -> None:
    from fguide.cli.main import build_parser

    parser = build_parser()
    base = ["finetune", "--classifier", "c", "--data", "d", "--out", "o"]
    args = parser.parse_args(base)
    defaults = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        flag = "bins" if f.name == "n_bins" else f.name
        if hasattr(args, flag):
            assert getattr(args, flag) == getattr(defaults, f.name), f.name
    assert args.calibration_loss == "smooth_ece" and args.softplus_beta is None
    old = parser.parse_args([*base, "--weights", "w.pt", "--n-bins", "7", "--resize", "64"])
    assert (old.classifier_weights, old.bins, old.classifier_resize) == ("w.pt", 7, 64)
    new = parser.parse_args(
        [*base, "--classifier-weights", "w.pt", "--bins", "7", "--softplus-beta", "relu"]
    )
    assert (new.classifier_weights, new.bins, new.softplus_beta) == ("w.pt", 7, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    help_text = capsys.readouterr().out
    assert "--weights" not in help_text.replace("--classifier-weights", "")
    assert "--n-bins" not in help_text and "--bins" in help_text


def test_one_run_per_folder_and_only_its_own_temporaries_removed(tmp_path: Path) -> None:
    from fguide.io.files import RECORD
    from fguide.io.runs import FolderLock

    cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0)
    source = _small_images(2, 12, 3)
    out = tmp_path / "run"
    finetune(wrap_module(_linear3()), source, out, cfg, progress=False)
    token = json.loads((out / RECORD).read_text())["token"]
    stale = out / f".checkpoint.pt.fg-{token}-k1ll3d.tmp"  # a write of this run cut short
    stale.write_bytes(b"partial")
    lookalike = out / ".checkpoint.pt.k1ll3d.tmp"  # fguide's pattern, not this folder's token
    lookalike.write_bytes(b"a user's file")
    with FolderLock(out), pytest.raises(ValueError, match="in use by pid"):
        finetune(wrap_module(_linear3()), source, out, cfg)
    assert stale.exists()  # nothing was touched while another process held the folder
    res = finetune(wrap_module(_linear3()), source, out, cfg, progress=False)
    assert res.status == "already_complete" and not stale.exists()
    assert lookalike.read_bytes() == b"a user's file"


def test_cli_refuses_a_folder_holding_the_users_files(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.npz"
    np.savez(
        data, np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), np.uint8), np.arange(12) % 3
    )
    out = tmp_path / "out"
    out.mkdir()
    mine = {
        "model.pt": b"my model",
        "report.json": b"{}",
        "log.jsonl": b"{}\n",
        "eval_before.json": b"{}",
        "reliability_before.png": b"my plot",
        "figure.png": b"my other plot",
    }
    for name, content in mine.items():
        (out / name).write_bytes(content)
    assert main(_cli(tmp_path, data, f"{module_file}:linear3")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and all(name in err for name in mine), err
    # Untouched, and no lock file or record left in the user's folder.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    # The same command into a new folder runs; rerun into its own folder, it finds its work.
    fresh = _cli(tmp_path, data, f"{module_file}:linear3")
    fresh[fresh.index("--out") + 1] = str(tmp_path / "new")
    assert main(fresh) == 0 and main(fresh) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_finetune_folder_of_an_earlier_version_resumes_and_is_never_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fguide.io.files import RECORD

    cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0)
    source = _small_images(2, 12, 3)
    out = tmp_path / "run"
    finetune(wrap_module(_linear3()), source, out, cfg, progress=False)
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8))
    for legacy in (False, True):  # with its record, and as fguide wrote it before records
        if legacy:
            (out / RECORD).unlink()
        argv = ["evaluate", str(ref), str(out), "--out", str(tmp_path / "eval"), "--no-cache"]
        assert main([*argv, "--inception-weights", str(tmp_path / "w.pth")]) == 2
        err = capsys.readouterr().err
        assert f"{out} is a fguide finetune folder, not a sample run or image folder" in err
    # The folder without its record is still this job's (its checkpoint proves it).
    config2 = dataclasses.replace(cfg, iterations=2)
    resumed = finetune(wrap_module(_linear3()), source, out, config2, progress=False)
    assert resumed.status == "completed"
    assert (out / RECORD).is_file()


def test_damaged_or_malicious_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    import pickle

    cfg = FinetuneConfig(iterations=1, batch_size=4, holdout=3, workers=0)
    source = _small_images(2, 12, 3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    good = finetune(wrap_module(net), source, tmp_path / "good", cfg, progress=False)
    whole = (good.out_dir / "checkpoint.pt").read_bytes()
    ran = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (ran,))

    for name, content in (
        ("empty", b""),
        ("truncated", whole[: len(whole) // 2]),
        ("pickle", pickle.dumps(Evil(), protocol=2)),
        ("foreign", None),
    ):
        out = tmp_path / name
        out.mkdir()
        if content is None:
            torch.save({"step": 1}, out / "checkpoint.pt")  # a valid torch file, not ours
        else:
            (out / "checkpoint.pt").write_bytes(content)
        with pytest.raises(ValueError, match=r"checkpoint\.pt .*(cannot be read|is not a)"):
            finetune(wrap_module(net), source, out, cfg, progress=False)
    assert not ran.exists()  # the pickle's code was never run


def test_annealed_lr_and_per_step_noise_draws(tmp_path: Path) -> None:
    # ADM's anneal: step k (0-based) trains with lr·(1 − k/N); each step draws its own (t, ε).
    seen: list[list[int]] = []

    class NoisyProbe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(192, 3)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(t.tolist())
            return self.lin(x.flatten(1))

    n, lr = 4, 1e-3
    cfg = FinetuneConfig(
        iterations=n, batch_size=4, lr=lr, anneal_lr=True, input="noisy", holdout=3, workers=0,
        log_every=1,
    )  # fmt: skip
    source = _small_images(2, 12, 3)
    res = finetune(wrap_module(NoisyProbe()), source, tmp_path, cfg, progress=False)
    logged = [json.loads(s)["lr"] for s in (res.out_dir / "log.jsonl").read_text().splitlines()]
    expected = [lr * (1 - k / n) for k in range(n)]
    tolerances.assert_close(logged, expected, torch.float64, depth=3)  # lr·(1 − k/N)
    assert len(seen) == n and len({tuple(t) for t in seen}) == n  # no two steps share draws

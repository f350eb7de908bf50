"""``fguide sample`` end to end on CPU with tiny random models: files, resume, corruption,
batch-size invariance, torchrun (gloo), configuration mismatch and bad inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_close, network_depth
from torch import nn

from fguide.cli.main import main
from fguide.models.presets import create_model
from fguide.models.resnet import resnet
from fguide.sampling import (
    ConfigMismatchError,
    SampleConfig,
    plan_shards,
    resolve_config,
    run_sampling,
    sample_labels,
)
from fguide.sampling.configs import PAPER_CONFIGS, apply_paper_config

TESTS = Path(__file__).resolve().parent
FLAGS = (
    "image_size=8 num_channels=32 num_res_blocks=1 channel_mult=1,2 attention_resolutions=4 "
    "num_head_channels=32 class_cond=True learn_sigma=True"
)
SPEC = "test_sampling_run:tiny_classifier"
# The reference run most tests compare against: 7 samples in shards of 2, batch 2, JS guidance.
REF = dict(num_samples=7, batch_size=2, shard_size=2)


# -- tiny classifiers (import specs) ----------------------------------------------------------


def tiny_classifier() -> nn.Module:
    """x̂0 [B, 3, 8, 8] → 1000 logits; deterministic weights, no global RNG."""
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Softplus(), nn.Linear(32, 1000))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


WEIGHT_SEED = {"seed": 1}  # tests change it to change the weights behind an import spec


def seeded_classifier() -> nn.Module:
    """Like :func:`tiny_classifier`, with weights from ``WEIGHT_SEED`` (read at build time)."""
    g = torch.Generator().manual_seed(WEIGHT_SEED["seed"])
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Softplus(), nn.Linear(32, 1000))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


def tiny4_classifier() -> nn.Module:
    """x̂0 [B, 3, 8, 8] → 4 logits (the tiny EDM reference network has 4 classes)."""
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Softplus(), nn.Linear(16, 4))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net


def wrong_size_classifier() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1000))


class _FailsLater(nn.Module):
    """Finite logits whose gradient is infinite from forward call ``after + 1`` on."""

    def __init__(self, after: int):
        super().__init__()
        self.net, self.after, self.calls = tiny_classifier(), after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.net(x)
        if self.calls > self.after:  # sqrt(0) = 0, but d sqrt/dx = inf there
            logits = logits + torch.sqrt(x - x.detach()).flatten(1).sum(1, keepdim=True)
        return logits


def fails_on_second_batch() -> nn.Module:
    return _FailsLater(after=1 + 4)  # the probe, then 4 steps of the first batch


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and 2 threads on shared cores are ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    for p in net.parameters():  # ADM zero-initialises output layers: make every layer matter
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


def config(out: Path, ckpt: Path, **kw: Any) -> SampleConfig:
    base: dict[str, Any] = dict(
        out=out,
        model=ckpt,
        model_flags=FLAGS,
        classifier=SPEC,
        method="js",
        steps="4",
        seed=3,
        device="cpu",
        progress=False,
        **REF,
    )
    base.update(kw)
    return SampleConfig(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_sampling(config(out, ckpt)).complete
    finally:
        torch.set_num_threads(n)
    return out


def load(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as z:
        return z["arr_0"], z["arr_1"]


def label_list(mode: str, seed: int, indices: Any, num_classes: int) -> list[int]:
    out = sample_labels(mode, seed, indices, num_classes)
    assert out is not None
    return [int(v) for v in out]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_args(out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "sample", "--out", str(out), "--model", str(ckpt), "--model-flags", FLAGS,
        "--classifier", SPEC, "--method", "js", "--steps", "4", "--seed", "3",
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


# -- tests ---------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "run"
    args = cli_args(out, ckpt, "--num-samples", "5", "--batch-size", "2", "--shard-size", "2")
    assert main(args) == 0
    images, labels = load(out)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int64
    assert labels.tolist() == label_list("uniform", 3, range(5), 1000)
    assert len({im.tobytes() for im in images}) == 5 and images.std() > 10

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["samples"]["sha256"] == sha(out / "samples.npz")
    assert [s["samples"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 5]]
    shard_images = []
    for s in manifest["shards"]:
        assert s["sha256"] == sha(out / s["file"])
        with np.load(out / s["file"]) as z:
            shard_images.append(z["arr_0"])
    np.testing.assert_array_equal(np.concatenate(shard_images), images)
    ident = manifest["identity"]
    assert (ident["method"], ident["alpha"], ident["eps"], ident["tau2"]) == ("js", 0.09, 0.1, 0.5)
    assert ident["model_sha256"] == sha(ckpt)
    assert manifest["provenance"]["torch_version"] == torch.__version__

    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["curves"]["step"] == [0, 1, 2, 3] and traj["run"]["method"] == "js"
    conf = traj["curves"]["confidence_mean"]
    assert all(0 <= c <= 1 for c in conf) and conf[-1] > conf[0]  # guidance raises p_y
    with Image.open(out / "grid.png") as im:
        assert im.size == (5 * 8, 8)
    assert oct((out / "samples.npz").stat().st_mode & 0o777) != oct(0o600)


def test_other_samplers_classifiers_and_labels(tmp_path: Path, ckpt: Path) -> None:
    weights = tmp_path / "r18.pth"
    torch.save(resnet("resnet18").state_dict(), weights)
    res = run_sampling(
        config(
            tmp_path / "ddim",
            ckpt,
            classifier="resnet18",
            classifier_weights=weights,
            sampler="ddim",
            steps="ddim3",
            labels="balanced",
            precision="bf16",
            num_samples=4,
            batch_size=4,
            shard_size=4,
        )
    )
    images, labels = load(res.out)
    assert labels.tolist() == label_list("balanced", 3, range(4), 1000)
    assert len(set(labels.tolist())) == 4  # one block of a permutation: no repeats
    ident = json.loads(res.manifest.read_text())["identity"]
    assert (ident["softplus_beta"], ident["precision"], ident["eta"]) == (3.0, "bf16", 0.0)
    assert ident["resolved"]["classifier"]["kind"] == "resnet"

    heun = run_sampling(config(tmp_path / "heun", ckpt, sampler="heun", steps="3", num_samples=2))
    assert json.loads(heun.manifest.read_text())["identity"]["scale"] == 0.004  # EluCD's G
    assert np.isfinite(load(heun.out)[0]).all()

    plain = run_sampling(
        config(tmp_path / "none", ckpt, method="none", classifier=None, labels="7", num_samples=2)
    )
    images, labels = load(plain.out)
    assert labels.tolist() == [7, 7]
    traj = json.loads((plain.out / "trajectory.json").read_text())
    assert traj["curves"]["step"] == []  # unguided, no classifier: nothing to record


def test_stop_and_resume_equals_uninterrupted(tmp_path: Path, ckpt: Path, reference: Path) -> None:
    out = tmp_path / "run"
    first = run_sampling(config(out, ckpt, max_shards=2))
    assert not first.complete and first.generated == [(0, 2), (2, 4)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["missing_shards"] == [[4, 6], [6, 7]]
    assert not (out / "samples.npz").exists()

    second = run_sampling(config(out, ckpt, batch_size=3))  # another batch size is fine
    assert second.complete and second.generated == [(4, 6), (6, 7)]
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    ref_traj = json.loads((reference / "trajectory.json").read_text())["curves"]
    traj = json.loads((out / "trajectory.json").read_text())["curves"]
    # batches of 3 against batches of 2: float32 rounding through 4 steps of the network and the
    # classifier's gradient, read as probabilities (≤ 1) by the classifier
    unet = create_model(**dict(kv.split("=") for kv in FLAGS.split()))
    depth = 4 * (network_depth(unet) + 3 * network_depth(tiny_classifier()))
    for key in ("confidence_mean", "ece"):
        assert_close(traj[key], ref_traj[key], torch.float32, depth, scale=1.0, msg=key)


def test_killed_process_resumes(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "run"
    args = cli_args(out, ckpt, "--num-samples", "20", "--batch-size", "2", "--shard-size", "2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fguide.cli.main", *args],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list((out / "shards").glob("*.json")) and proc.poll() is None:
            assert time.time() < deadline, "the sampling process wrote no shard"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(list((out / "shards").glob("*.json")))
    assert 1 <= done_before < 10  # killed part-way

    res = run_sampling(config(out, ckpt, num_samples=20))
    assert res.complete and len(res.generated) == 10 - done_before
    assert not list((out / "shards").glob(".*.tmp"))
    ref = run_sampling(config(tmp_path / "ref", ckpt, num_samples=20))
    assert sha(res.out / "samples.npz") == sha(ref.out / "samples.npz")


def test_corrupt_shards_are_regenerated(tmp_path: Path, ckpt: Path, reference: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shards = out / "shards"
    truncated = shards / "shard-00000000-00000002.npz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    flipped = shards / "shard-00000002-00000004.npz"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # same size, one pixel changed
    flipped.write_bytes(bytes(data))
    (shards / "shard-00000004-00000006.json").unlink()  # killed between npz and sidecar
    (out / "samples.npz").unlink()

    res = run_sampling(config(out, ckpt))
    assert res.regenerated == [(0, 2), (2, 4), (4, 6)] and res.generated == res.regenerated
    assert sha(out / "samples.npz") == sha(reference / "samples.npz")
    for f in sorted(shards.glob("*.npz")):
        assert f.read_bytes() == (reference / "shards" / f.name).read_bytes(), f.name


def test_batch_size_invariance(tmp_path: Path, ckpt: Path, reference: Path) -> None:
    res = run_sampling(config(tmp_path / "b3", ckpt, batch_size=3))
    np.testing.assert_array_equal(load(res.out)[0], load(reference)[0])

    # Tilting: groups are index blocks of 2, so batches of 2 or 4 and 5 or 6 samples agree.
    tilted = dict(method="tilted", tilt_group=2)
    a = run_sampling(config(tmp_path / "t5", ckpt, num_samples=5, batch_size=2, **tilted))
    b = run_sampling(
        config(tmp_path / "t6", ckpt, num_samples=6, batch_size=4, shard_size=4, **tilted)
    )
    np.testing.assert_array_equal(load(a.out)[0], load(b.out)[0][:5])
    assert not np.array_equal(load(a.out)[0], load(reference)[0][:5])
    summary = json.loads((a.out / "trajectory.json").read_text())["summary"]
    assert summary["max_tilt_weight"] > 1.0  # the weights did tilt


def test_torchrun_two_processes_match_one(tmp_path: Path, ckpt: Path, reference: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fguide.cli.main",
        *cli_args(out, ckpt, "--num-samples", "7", "--batch-size", "2", "--shard-size", "2"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha(out / "samples.npz") == sha(reference / "samples.npz")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert manifest["provenance"]["world_size"] == 2
    curves = json.loads((out / "trajectory.json").read_text())["curves"]
    assert curves == json.loads((reference / "trajectory.json").read_text())["curves"]


def test_other_configuration_is_refused_and_more_samples_extend(
    tmp_path: Path, ckpt: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(ConfigMismatchError, match="seed: 3 -> 4"):
        run_sampling(config(out, ckpt, seed=4))
    args = cli_args(out, ckpt, "--num-samples", "7", "--shard-size", "2")
    assert main([*args, "--alpha", "0.2"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert sha(out / "samples.npz") == sha(reference / "samples.npz")  # nothing was touched

    res = run_sampling(config(out, ckpt, num_samples=9))
    assert res.generated == [(6, 8), (8, 9)] and res.regenerated == []
    images, _ = load(out)
    np.testing.assert_array_equal(images[:7], load(reference)[0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "missing.pt"], "not found: missing.pt"),
        (["--model-preset", "128x128_difusion"], "unknown ADM preset '128x128_difusion'"),
        (["--labels", "1000"], "class 1000 is out of range [0, 1000)"),
        (["--image-size", "16"], "--image-size: 16 does not match"),
        (["--model-flags", FLAGS.replace("num_channels=32", "num_channels=64")], "does not fit"),
        (["--classifier", "resnet18"], "--classifier-weights"),
        (["--classifier-weights", "nope.pth"], "--classifier-weights: file not found"),
        (["--classifier", "test_sampling_run:wrong_size_classifier"], "fails on a [1, 3, 8, 8]"),
        (["--method", "tilted", "--tilt-group", "3"], "multiple of --tilt-group"),
        (["--method", "base", "--alpha", "0.1"], "alpha is a divergence weight"),
        (["--steps", "ddim999"], "cannot create exactly 999 steps"),
    ],
)
def test_bad_inputs(
    tmp_path: Path,
    ckpt: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    args = cli_args(tmp_path / "run", ckpt, "--num-samples", "2", "--shard-size", "2", *extra)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "samples.npz").exists()


def test_method_needs_classifier(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(ValueError, match="needs a classifier"):
        run_sampling(config(tmp_path / "run", ckpt, classifier=None, method="rkl"))


def test_non_finite_guidance_names_step_and_samples(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli_args(tmp_path / "run", ckpt, "--num-samples", "4", "--batch-size", "2")
    args[args.index(SPEC)] = "test_sampling_run:fails_on_second_batch"
    assert main([*args, "--shard-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "sampling step 0" in err and "sample indices [2, 3]" in err


def test_paper_configs(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "elucd-r50-128": ("resnet50", "base", None),
        "elucd-r101-128": ("resnet101", "base", None),
        "rkl-r50-128": ("resnet50", "rkl", 0.1),
        "js-r101-128": ("resnet101", "js", 0.09),
        "fkl-r101-128": ("resnet101", "fkl", 0.09),
        "rkl-r101-128": ("resnet101", "rkl", 0.1),
        "hellinger-r101-128": ("resnet101", "hellinger", 0.09),
        "entropy-r50-128": ("resnet50", "entropy", None),
        "tilted-r50-128": ("resnet50", "tilted", None),
        "adm-cg-128": ("128x128_classifier", "logsoftmax", None),
    }
    others = {  # checked end to end by their own tests
        "elucd-edm-r101-10", "elucd-edm-r101-18", "elucd-edm-r101-36",
        "elucd-edm-r101-stoch-250", "edm-imagenet64-stoch", "elucd-clip-256",
        "elucd-dit-xl2-256", "sd15", "sd15-ddim", "sdxl",
    }  # fmt: skip
    assert set(PAPER_CONFIGS) == set(expected) | others
    for name, (clf, method, alpha) in expected.items():
        s = resolve_config(
            SampleConfig(out=Path("o"), model=Path("m"), **apply_paper_config(name, {}))
        )
        assert (s.classifier, s.method, s.alpha, s.steps, s.sampler) == (
            clf, method, alpha, "250", "ddpm",
        )  # fmt: skip
        assert s.model_preset == "128x128_diffusion" and s.tau1 == 1.0
        if clf.startswith("resnet"):
            assert (s.tau2, s.scale, s.sine_factor, s.softplus_beta) == (0.5, 1.0, 0.3, 3.0)
    adm = resolve_config(SampleConfig(Path("o"), Path("m"), **apply_paper_config("adm-cg-128", {})))
    assert (adm.tau2, adm.scale, adm.sine_factor) == (1.0, 0.5, 0.0)
    tilted = resolve_config(
        SampleConfig(Path("o"), Path("m"), **apply_paper_config("tilted-r50-128", {}))
    )
    assert tilted.t_tilt == -0.2
    entropy = apply_paper_config("entropy-r50-128", {})
    assert (entropy["lam_max"], entropy["lam_min"]) == (0.2, 0.05)
    assert apply_paper_config("rkl-r50-128", {"alpha": 0.2})["alpha"] == 0.2
    assert "alpha" not in apply_paper_config("rkl-r50-128", {"method": "base"})
    assert main(["sample", "--list-configs"]) == 0
    assert "js-r101-128" in capsys.readouterr().out


def test_labels_and_shards_depend_only_on_index() -> None:
    full = label_list("uniform", 0, range(40), 10)
    assert full[25:30] == label_list("uniform", 0, [25, 26, 27, 28, 29], 10)
    assert label_list("uniform", 1, range(40), 10) != full
    balanced = label_list("balanced", 0, range(30), 10)
    assert np.bincount(balanced, minlength=10).tolist() == [3] * 10
    assert sample_labels("uniform", 0, range(3), None) is None
    assert plan_shards(7, 3) == [(0, 3), (3, 6), (6, 7)]


def test_identity_covers_the_weights_behind_an_import_spec(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An import spec names code, not weights: the run identity must hash the weights in use,
    # or a resumed run would silently mix samples of two classifiers (issue 10, item 2).
    out = tmp_path / "run"
    cfg = config(out, ckpt, classifier="test_sampling_run:seeded_classifier", max_shards=1)
    assert not run_sampling(cfg).complete
    monkeypatch.setitem(WEIGHT_SEED, "seed", 2)
    with pytest.raises(ConfigMismatchError, match="classifier_state_sha256"):
        run_sampling(dataclasses.replace(cfg, max_shards=None))
    monkeypatch.setitem(WEIGHT_SEED, "seed", 1)
    assert run_sampling(dataclasses.replace(cfg, max_shards=None)).complete


GUIDE_SOURCE = """
import torch
from torch import nn

TEMPERATURE = {temperature}


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(192, 1000)
        g = torch.Generator().manual_seed(1)
        for p in self.lin.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x):
        return self.lin(x.flatten(1)) / TEMPERATURE  # read at every call


def make():
    return Guide()
"""


def test_identity_covers_the_source_of_an_import_spec(tmp_path: Path, ckpt: Path) -> None:
    # Same weights, other behaviour: a module constant read in forward changed between the
    # interrupted run and its resumption. The spec's file is hashed into the identity.
    module = tmp_path / "guide_module.py"
    module.write_text(GUIDE_SOURCE.format(temperature=1.0))
    out = tmp_path / "run"
    cfg = config(out, ckpt, classifier=f"{module}:make", max_shards=1)
    assert not run_sampling(cfg).complete
    module.write_text(GUIDE_SOURCE.format(temperature=2.0))
    with pytest.raises(ConfigMismatchError, match="classifier_source_sha256") as err:
        run_sampling(dataclasses.replace(cfg, max_shards=None))
    assert "classifier_state_sha256" not in str(err.value)  # the weights did not change
    module.write_text(GUIDE_SOURCE.format(temperature=1.0))
    assert run_sampling(dataclasses.replace(cfg, max_shards=None)).complete


def test_first_sample_variance_tracking_puts_the_batch_size_in_the_identity(
    tmp_path: Path, ckpt: Path
) -> None:
    # EluCD's first_sample mode takes σ²_max from a batch's first sample: a resumption with
    # another batch size would mix samples of two couplings, so it is another run.
    out = tmp_path / "run"
    cfg = config(out, ckpt, variance_tracking="first_sample", max_shards=1)
    assert not run_sampling(cfg).complete
    with pytest.raises(ConfigMismatchError, match="batch_size: 2 -> 1"):
        run_sampling(dataclasses.replace(cfg, batch_size=1, max_shards=None))
    assert run_sampling(dataclasses.replace(cfg, max_shards=None)).complete


def test_pipeline_folder_identity_hashes_names_with_contents(tmp_path: Path) -> None:
    # Two weight files swapped (same names, same set of contents) are another model.
    from fguide.sampling.run import _model_sha256

    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text("{}")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(b"unet weights")
    vae.write_bytes(b"vae weights")
    before = _model_sha256(folder)
    unet.write_bytes(b"vae weights")
    vae.write_bytes(b"unet weights")
    swapped = _model_sha256(folder)
    assert swapped != before
    (folder / "unet" / "config.json").write_text("{}")  # a config is part of the model too
    assert _model_sha256(folder) != swapped


def test_adm_classifier_guides_with_adm_plain_mean_condition(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ADM's noise-aware classifier: μ' = μ + Σ γ g (condition_mean), no EluCD sine boost;
    # an x̂0 classifier keeps EluCD's γ_sine = 0.3 (METHODS.md §5).
    import fguide.sampling.batch
    from fguide.config import parse_flags
    from fguide.models.presets import create_classifier

    assert resolve_config(config(tmp_path / "r", ckpt, classifier="resnet50")).sine_factor == 0.3
    adm = resolve_config(config(tmp_path / "a", ckpt, classifier="128x128_classifier"))
    assert adm.sine_factor == 0.0
    flags = (
        "image_size=8 classifier_width=32 classifier_depth=1 "
        "classifier_attention_resolutions=4 channel_mult=1,2"
    )
    torch.manual_seed(0)
    weights = tmp_path / "adm_classifier.pt"
    torch.save(create_classifier(**parse_flags(flags)).state_dict(), weights)
    seen: list[float] = []
    ddpm = fguide.sampling.batch.ddpm

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs["sine_factor"])
        return ddpm(*args, **kwargs)

    monkeypatch.setattr(fguide.sampling.batch, "ddpm", spy)
    cfg = config(
        tmp_path / "run", ckpt, classifier="adm", classifier_flags=flags,
        classifier_weights=weights, method="logsoftmax", num_samples=2,
    )  # fmt: skip
    assert run_sampling(cfg).complete
    assert seen == [0.0]


def test_folder_with_foreign_files_is_refused(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"somebody's samples")
    with pytest.raises(ValueError, match="no fguide run wrote"):
        run_sampling(config(out, ckpt))
    assert (out / "samples.npz").read_bytes() == b"somebody's samples"
    assert not (out / ".fguide.lock").exists()  # refused before the lock was taken
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not a folder|File exists|Not a directory"):
        run_sampling(config(tmp_path / "file", ckpt))


def test_users_files_survive_and_a_refused_folder_keeps_no_lock(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = tmp_path / "refused"
    refused.mkdir()
    (refused / "notes.txt").write_text("mine")
    assert main(cli_args(refused, ckpt, "--num-samples", "2")) == 2
    assert "(notes.txt)" in capsys.readouterr().err
    assert [p.name for p in refused.iterdir()] == ["notes.txt"]  # checked before locking

    out = tmp_path / "run"
    out.mkdir()
    lookalike = out / ".samples.npz.foo.tmp"  # a user's file in the temporaries' pattern
    lookalike.write_bytes(b"mine")
    assert main(cli_args(out, ckpt, "--num-samples", "2")) == 0
    token = json.loads((out / ".fguide.json").read_text())["token"]
    ours = [out / f".samples.npz.fg-{token}-k1ll3d.tmp"]  # writes of this run cut short
    ours.append(out / "shards" / f".shard-00000000-00000002.npz.fg-{token}-k1ll3d.tmp")
    for p in ours:
        p.write_bytes(b"partial")
    assert main(cli_args(out, ckpt, "--num-samples", "2")) == 0  # rerun into its own folder
    assert not any(p.exists() for p in ours)
    assert lookalike.read_bytes() == b"mine"


def test_files_copied_in_from_another_run_are_refused(
    tmp_path: Path, ckpt: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    assert run_sampling(config(other, ckpt, seed=4, num_samples=2)).complete
    run = tmp_path / "run"
    shutil.copytree(reference, run)

    def calibration(out: str) -> int:
        return main(["calibration", "--trajectory", str(run), "--out", str(tmp_path / out)])

    assert calibration("cal0") == 0  # its own trajectory
    shutil.copy(other / "trajectory.json", run / "trajectory.json")
    assert calibration("cal1") == 2
    assert f"{run / 'trajectory.json'} is not the trajectory.json" in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["trajectory_sha256"]  # as earlier versions wrote it: the identity decides
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert calibration("cal2") == 2
    assert f"{run / 'trajectory.json'} is not the trajectory.json" in capsys.readouterr().err

    shutil.copy(other / "samples.npz", run / "samples.npz")
    for samples in (run, run / "samples.npz"):
        argv = ["evaluate", str(other), str(samples), "--out", str(tmp_path / "ev"), "--no-cache"]
        assert main([*argv, "--inception-weights", str(tmp_path / "unused.pth")]) == 2
        assert f"{run / 'samples.npz'} is not the file" in capsys.readouterr().err


def test_locked_folder_is_refused_naming_the_holder(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from fguide.io.runs import FolderLock\n"
            "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by pid {holder.pid}"):
            run_sampling(config(out, ckpt))
    finally:
        holder.kill()
        holder.wait()
    assert run_sampling(config(out, ckpt, num_samples=2)).complete  # a dead holder frees it


def test_batch_size_changes_a_sample_by_rounding_only(ckpt: Path, tmp_path: Path) -> None:
    # The guarantee stated in the README: identical bytes for the same batch size (any number
    # of processes, any interruption); across batch sizes equal up to float32 rounding, i.e. at
    # most one quantisation level on rare pixels. Checked over many seeds.
    from fguide.families import build_components
    from fguide.io.images import to_uint8_nhwc
    from fguide.sampling import sample_batch

    diffs, changed, total = [], 0, 0
    for seed in range(12):
        cfg = resolve_config(config(tmp_path / "unused", ckpt, seed=seed))
        comp = build_components(cfg, "cpu")
        labels = sample_labels(cfg.labels, seed, range(4), comp.num_classes)
        assert labels is not None
        together = to_uint8_nhwc(sample_batch(comp, cfg, range(4), labels)).astype(int)
        alone = np.concatenate(
            [
                to_uint8_nhwc(sample_batch(comp, cfg, [i], labels[i : i + 1])).astype(int)
                for i in range(4)
            ]
        )
        d = np.abs(together - alone)
        diffs.append(int(d.max()))
        changed += int((d > 0).sum())
        total += d.size
    assert max(diffs) <= 1, diffs
    assert changed / total < 1e-3, (changed, total)


EDM_PICKLE = TESTS / "reference" / "edm_tiny_snapshot.pkl"  # pickled by NVlabs' own code


@pytest.mark.parametrize("churn", [[], ["--s-churn", "40", "--s-tmin", "0.05", "--s-tmax", "50"]])
def test_nvlabs_edm_network_samples_with_heun_by_default(
    tmp_path: Path, churn: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edm"
    argv = [
        "sample", "--out", str(out), "--model", str(EDM_PICKLE),
        "--classifier", "test_sampling_run:tiny4_classifier", "--steps", "4", "--seed", "1",
        "--num-samples", "3", "--batch-size", "2", "--device", "cpu", "--no-progress", *churn,
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    identity = manifest["identity"]
    assert identity["sampler"] == "heun" and identity["resolved"]["model"]["family"] == "nvlabs"
    assert identity["tau2"] == 0.0 and identity["scale"] == 0.004  # EluCD's EDM setting
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (3, 8, 8, 3) and set(labels.tolist()) <= {0, 1, 2, 3}
    traj = json.loads((out / "trajectory.json").read_text())
    assert len(traj["curves"]["step"]) == 4
    # batch size 1 gives the same samples (per-sample noise, churn included), up to rounding
    again = tmp_path / "edm1"
    assert main([*argv[:2], str(again), *argv[3:], "--batch-size", "1"]) == 0
    with np.load(again / "samples.npz") as z:
        assert np.abs(z["arr_0"].astype(int) - images.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "name", ["elucd-edm-r101-10", "elucd-edm-r101-18", "elucd-edm-r101-36",
             "elucd-edm-r101-stoch-250", "edm-imagenet64-stoch"],
)  # fmt: skip
def test_edm_configurations_run_end_to_end(tmp_path: Path, name: str) -> None:
    # The configuration's settings on the tiny NVlabs network, with a tiny ResNet as the guide
    # (4 classes, 8x8 inputs) in place of ResNet-101.
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(resnet("resnet18", num_classes=4).state_dict(), weights)
    out = tmp_path / "run"
    argv = [
        "sample", "--config", name, "--out", str(out), "--model", str(EDM_PICKLE),
        "--num-samples", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    if name.startswith("elucd"):
        argv += ["--classifier", "resnet18", "--classifier-weights", str(weights)]
    assert main(argv) == 0
    identity = json.loads((out / "manifest.json").read_text())["identity"]
    settings = PAPER_CONFIGS[name].settings
    resolved_default = {"s_churn": 0.0}  # deterministic Heun: churn 0, window not applicable
    for key in ("sampler", "steps", "s_churn", "s_tmin", "s_tmax", "s_noise", "scale", "tau2"):
        assert identity[key] == settings.get(key, resolved_default.get(key)), key
    if name.startswith("elucd"):
        assert identity["resolved"]["classifier"]["softplus_beta"] == 5.0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize("method", ["none", "js"])
def test_nan_from_the_diffusion_model_is_blamed_on_the_model(
    tmp_path: Path, ckpt: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = torch.load(ckpt, weights_only=True)
    key = next(k for k in sd if k.endswith("out.2.bias"))  # the output layer's bias
    sd[key] = torch.full_like(sd[key], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    args = cli_args(tmp_path / "run", bad, "--num-samples", "2", "--shard-size", "2")
    args[args.index("js")] = method
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite output of the diffusion model" in err and "--model" in err, err
    assert "sample indices [0, 1]" in err
    assert not (tmp_path / "run" / "samples.npz").exists()  # never "complete" with black images


def test_gpu_path_options_on_cpu(tmp_path: Path, ckpt: Path, reference: Path) -> None:
    # channels_last changes the memory layout only: the same samples within rounding, and the
    # same run identity (it resumes the reference's run); the classifier's autocast precision
    # is part of the identity. No batch size given: 64 on CPU, recorded in every shard.
    out = tmp_path / "cl"
    shutil.copytree(reference, out)
    (out / "samples.npz").unlink()
    for f in (out / "shards").glob("shard-00000004-*"):
        f.unlink()
    res = run_sampling(config(out, ckpt, channels_last=True))
    assert res.generated == [(4, 6)]
    # float32 rounding moves a pixel by at most one uint8 level (ADM's truncating quantisation)
    np.testing.assert_array_less(np.abs(load(out)[0].astype(int) - load(reference)[0]), 2)

    bf = run_sampling(config(tmp_path / "bf16", ckpt, classifier_precision="bf16", batch_size=None))
    manifest = json.loads((bf.out / "manifest.json").read_text())
    assert manifest["identity"]["classifier_precision"] == "bf16"
    assert {s["batch_size"] for s in manifest["shards"]} == {64}
    assert not np.array_equal(load(bf.out)[0], load(reference)[0])  # the guide's precision acts
    with pytest.raises(ValueError, match="classifier_precision"):
        resolve_config(config(tmp_path / "x", ckpt, classifier_precision="fp8"))


def check_compile_and_channels_last(
    argv: list[str],
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Callable[..., np.ndarray], np.ndarray]:
    """Run ``fguide sample *argv`` plainly, with ``--compile`` (the eager backend: inductor takes
    minutes on CPU) and with ``--channels-last``; assert the compiled run gives the same bytes
    and logs its compile time, and NHWC changes a sample by rounding only. Returns ``run(name,
    *flags)`` (the samples as ints) and the plain samples."""
    from functools import partial

    from fguide.accel import compile_model
    from fguide.families import adm, nvlabs, pipelines

    for family in (adm, nvlabs, pipelines):  # each family compiles its own network
        monkeypatch.setattr(family, "compile_model", partial(compile_model, backend="eager"))

    def run(name: str, *extra: str) -> np.ndarray:
        assert main([*argv, "--out", str(out / name), *extra]) == 0
        with np.load(out / name / "samples.npz") as z:
            return np.asarray(z["arr_0"], dtype=int)

    plain = run("plain")
    capsys.readouterr()
    np.testing.assert_array_equal(run("compiled", "--compile"), plain)
    assert "torch.compile:" in capsys.readouterr().err
    assert np.abs(run("nhwc", "--channels-last") - plain).max() <= 1
    return run, plain


def test_edm_gpu_path_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sample", "--model", str(EDM_PICKLE), "--classifier", "test_sampling_run:tiny4_classifier",
        "--steps", "4", "--seed", "1", "--num-samples", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    check_compile_and_channels_last(argv, tmp_path, monkeypatch, capsys)

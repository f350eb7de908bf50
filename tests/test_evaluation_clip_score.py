"""``fguide evaluate --clip FOLDER``: the CLIP score of a run against its prompts, end to end on
a tiny random CLIP folder and a tiny run folder written with the run-folder writers.

The expected numbers come from :func:`fguide.metrics.clip_score.clip_score` called on the
images held in memory (one batch, the whole set), per prompt on the images whose sample index
is k mod n with that prompt alone — not from the command's streaming code path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from sd_folders import build_clip_folder, one_thread  # noqa: E402
from tolerances import assert_close, network_depth  # noqa: E402

import fguide.evaluation.clip_score as job  # noqa: E402
import fguide.evaluation.quality  # noqa: E402
import fguide.families  # noqa: E402
import fguide.io.features  # noqa: E402
import fguide.io.images  # noqa: E402
from fguide.cli.main import main  # noqa: E402
from fguide.evaluation import evaluate  # noqa: E402
from fguide.evaluation.clip_score import run_prompts  # noqa: E402
from fguide.families import ModelFamily  # noqa: E402
from fguide.io import runs  # noqa: E402
from fguide.io.features import LOGITS_DIM, POOL_DIM, SPATIAL_DIM, BatchFeatures  # noqa: E402
from fguide.metrics import FeatureStats  # noqa: E402
from fguide.metrics.clip_score import clip_score  # noqa: E402
from fguide.models.clip_reward import load_clip_score_model  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
T2I = "text-to-image-stub"  # a registered family that reads the prompts (Stable Diffusion's role)
N = 7  # samples: three prompts take 3, 2 and 2 of them (i mod 3)
CANDIDATES = ["a photo of a cat", "hot dog", "the sea at night", "red", "no dog", "photo", "hot"]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth uint8 images [n, 16, 16, 3] (a run's square samples)."""
    g = np.random.default_rng(seed)
    base = g.uniform(30, 225, (n, 4, 4, 3))
    img = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) + g.normal(0, 4, (n, 16, 16, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


class _TextToImage(ModelFamily):
    name = T2I
    reads = ("prompts", "prompt_file")


@pytest.fixture(scope="module", autouse=True)
def _t2i_family() -> Iterator[None]:
    """The registry with a text-to-image family (main has none until Stable Diffusion's lands:
    then runs of that family are the real case)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fguide.families, "FAMILIES", (*fguide.families.FAMILIES, _TextToImage()))
        yield


def _write_run(
    out: Path, images: np.ndarray, identity_extra: dict[str, Any], family: str | None = T2I
) -> Path:
    """A complete run folder through io/runs.py's writers (shards of 3, then the merge); its
    model of ``family`` (None: no family recorded, as ADM runs)."""
    model = {} if family is None else {"family": family}
    identity = {"format": runs.FORMAT, "seed": 0, "resolved": {"model": model}, **identity_extra}
    plan = runs.plan_shards(len(images), 3)
    sha = runs.identity_sha256(identity)
    runs.prepare_folder(out, identity, plan, {"seed": 0, **identity_extra})
    for i0, i1 in plan:
        runs.write_shard(
            out, i0, i1, images[i0:i1], None, runs.recorder_state(None), {"identity_sha256": sha}
        )
    samples = runs.merge_run(
        out, plan, sha, [], image_size=images.shape[1], with_labels=False, grid=4,
        manifest_extra={}, trajectory_run={"method": "none"},
    )  # fmt: skip
    assert samples == out / runs.SAMPLES
    return out


def _positive_prompts(clip_dir: Path, images: np.ndarray, n: int) -> list[str]:
    """n distinct candidates each with a positive mean cosine over the images i ≡ k (mod n), so
    that no score is clamped to 0 and every per-prompt value is informative."""
    model = load_clip_score_model(clip_dir)
    chosen: list[str] = []
    for k in range(n):
        group = images[np.arange(len(images)) % n == k]
        for c in CANDIDATES:
            if c not in chosen and clip_score(*model, group, [c]).score > 0:
                chosen.append(c)
                break
    assert len(chosen) == n
    return chosen


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("clip-eval")
    clip_dir = build_clip_folder(root / "clip")
    images = _images(N)
    prompts = _positive_prompts(clip_dir, images, 3)
    run = _write_run(root / "run", images, {"prompts": prompts})
    np.savez(root / "plain.npz", images)
    model = load_clip_score_model(clip_dir)
    return {
        "root": root,
        "clip": clip_dir,
        "images": images,
        "prompts": prompts,
        "run": run,
        "model": model,
        "depth": network_depth(model[0]),
    }


def _expected(world: dict[str, Any], prompts: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """The metric on the images in memory: overall (image i, prompt i mod n), and per prompt k
    on the images i ≡ k (mod n) against prompt k alone."""
    images, n = world["images"], len(prompts)
    overall = clip_score(*world["model"], images, prompts).score
    per = []
    for k, p in enumerate(prompts):
        group = images[np.arange(len(images)) % n == k]
        score = clip_score(*world["model"], group, [p]).score
        per.append({"prompt": p, "images": len(group), "score": score})
    return overall, per


def _assert_scores(world: dict[str, Any], clip: dict[str, Any], prompts: list[str]) -> None:
    overall, per = _expected(world, prompts)
    # float32 embeddings through both towers (batches of other sizes: other summation orders);
    # the score is 100 · a mean of cosines
    close = dict(dtype=torch.float32, depth=world["depth"], scale=100.0)
    assert_close(clip["clip_score"], overall, **close, msg="overall")
    assert [e["prompt"] for e in clip["per_prompt"]] == prompts
    assert [e["images"] for e in clip["per_prompt"]] == [e["images"] for e in per]
    for got, want in zip(clip["per_prompt"], per, strict=True):
        assert_close(got["clip_score"], want["score"], **close, msg=want["prompt"])


def _folder_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def test_run_prompts_score_equals_the_metric(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    features = job.image_features

    def counting(model: Any, processor: Any, images: np.ndarray, batch_size: int = 64) -> Any:
        seen.append(len(images))
        return features(model, processor, images, batch_size)

    monkeypatch.setattr(job, "image_features", counting)
    out = tmp_path / "ev"
    code, stdout, stderr = _cli(
        ["evaluate", str(world["run"]), "--clip", str(world["clip"]), "--out", str(out),
         "--batch-size", "2", "--no-progress"]
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads((out / "metrics.json").read_text())
    _assert_scores(world, data["clip"], world["prompts"])
    assert seen == [2, 2, 2, 1]  # streamed in batches of --batch-size
    assert data["metrics"] == {"clip_score": data["clip"]["clip_score"]}  # no reference: no FID
    assert data["reference"] is None and data["samples"]["num_images"] == N
    assert data["clip"]["prompts_source"] == "the run's manifest"
    assert data["provenance"]["clip_model_sha256"] == _folder_sha(world["clip"])
    assert data["clip"]["model"]["sha256"] == _folder_sha(world["clip"])
    row = next(line for line in stdout.splitlines() if line.startswith("CLIP score "))
    assert float(row.split()[-1]) == pytest.approx(data["clip"]["clip_score"], abs=5e-5)
    for entry in data["clip"]["per_prompt"]:  # one printed line per prompt: images, score
        line = next(s for s in stdout.splitlines() if s.endswith(f"  {entry['prompt']}"))
        assert int(line.split()[0]) == entry["images"]


def test_the_model_hash_covers_the_files_read(world: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    for f in world["clip"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "flax_model.msgpack").write_bytes(b"another copy of the weights, never read")
    assert job.clip_folder_sha256(folder)[0] == _folder_sha(world["clip"])
    (folder / "merges.txt").write_text((folder / "merges.txt").read_text() + "\n")
    assert job.clip_folder_sha256(folder)[0] != _folder_sha(world["clip"])


def test_given_prompts_take_precedence_and_score_an_npz(
    world: dict[str, Any], tmp_path: Path
) -> None:
    given = [p for p in CANDIDATES if p not in world["prompts"]][:2]
    code, _, stderr = _cli(
        ["evaluate", str(world["run"]), "--clip", str(world["clip"]), "--out",
         str(tmp_path / "a"), "--no-progress", "--clip-prompt", given[0], "--clip-prompt",
         given[1]]
    )  # fmt: skip
    assert code == 0, stderr
    clip = json.loads((tmp_path / "a" / "metrics.json").read_text())["clip"]
    _assert_scores(world, clip, given)
    assert clip["prompts_source"] == "given (instead of the run's 3 prompt(s))"
    # a prompt file, for an npz that records no prompts
    file = tmp_path / "prompts.txt"
    file.write_text(f"# scored against\n{world['prompts'][2]}\n\n{world['prompts'][0]}\n")
    code, _, stderr = _cli(
        ["evaluate", str(world["root"] / "plain.npz"), "--clip", str(world["clip"]), "--out",
         str(tmp_path / "b"), "--no-progress", "--clip-prompt-file", str(file)]
    )  # fmt: skip
    assert code == 0, stderr
    clip = json.loads((tmp_path / "b" / "metrics.json").read_text())["clip"]
    _assert_scores(world, clip, [world["prompts"][2], world["prompts"][0]])
    assert clip["prompts_source"] == f"file {file}"
    # more prompts than samples: the last has no image, no score, and a warning says so
    eight = [a for k in range(N + 1) for a in ("--clip-prompt", f"p{k}")]
    code, stdout, stderr = _cli(
        ["evaluate", str(world["root"] / "plain.npz"), "--clip", str(world["clip"]), "--out",
         str(tmp_path / "c"), "--no-progress", *eight]
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert [e["images"] for e in data["clip"]["per_prompt"]] == [1] * N + [0]
    assert data["clip"]["per_prompt"][N]["clip_score"] is None
    assert any("1 prompt(s) have no image" in w for w in data["warnings"])
    assert "1 prompt(s) have no image" in stderr
    assert stdout.splitlines()[-2].split() == ["0", "—", f"p{N}"]  # then "wrote ..."


def _fake_features(n: int, seed: int) -> BatchFeatures:
    g = np.random.default_rng(seed)
    pool = g.normal(size=(n, POOL_DIM)).astype(np.float32)
    spatial = g.normal(size=(n, SPATIAL_DIM)).astype(np.float32)
    logits = g.normal(size=(n, LOGITS_DIM)).astype(np.float32)
    return BatchFeatures(pool, logits, FeatureStats().update(pool), FeatureStats().update(spatial))


def test_with_a_reference_both_sets_of_metrics_are_kept(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Inception's features are faked (the FID path is tested in test_evaluation_quality.py):
    # what is under test is that FID & co and the CLIP score both reach metrics.json.
    ref = tmp_path / "ref.npz"
    np.savez(ref, _images(5, seed=1))
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read: the network is faked")
    feats = {ref: _fake_features(5, 1), world["run"] / runs.SAMPLES: _fake_features(N, 2)}
    monkeypatch.setattr(fguide.io.features, "extract_features", lambda s, *a, **k: feats[s.path])
    monkeypatch.setattr(fguide.evaluation.quality, "load_fid_inception", lambda *a, **k: None)
    hashed: list[Path] = []  # the run's samples.npz is hashed (checked) once for both metrics
    sha256_file = fguide.io.images.sha256_file

    def counting_sha(path: Path, *a: Any) -> str:
        hashed.append(Path(path))
        return sha256_file(path, *a)

    monkeypatch.setattr(fguide.io.images, "sha256_file", counting_sha)
    out = tmp_path / "ev"
    code, stdout, stderr = _cli(
        ["evaluate", str(ref), str(world["run"]), "--clip", str(world["clip"]), "--out",
         str(out), "--inception-weights", str(weights), "--no-cache", "--no-progress"]
    )  # fmt: skip
    assert code == 0, stderr
    assert hashed.count(world["run"] / runs.SAMPLES) == 1
    data = json.loads((out / "metrics.json").read_text())
    with warnings.catch_warnings():  # the small counts' warnings (also in data["warnings"])
        warnings.simplefilter("ignore")
        direct = evaluate(ref, world["run"], weights=weights, progress=False)
    assert {k: v for k, v in data["metrics"].items() if k != "clip_score"} == direct.metrics
    assert data["metrics"]["clip_score"] == data["clip"]["clip_score"]
    _assert_scores(world, data["clip"], world["prompts"])
    assert data["inception"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert data["reference"]["num_images"] == 5
    names = [line.split("  ")[0] for line in stdout.splitlines()]
    assert {"FID", "Precision", "CLIP score"} <= {n.strip() for n in names}
    # compared with itself: the CLIP row shows the compared score and a zero difference
    code, stdout, stderr = _cli(
        ["evaluate", str(ref), str(world["run"]), "--clip", str(world["clip"]), "--out",
         str(tmp_path / "again"), "--inception-weights", str(weights), "--no-cache",
         "--no-progress", "--compare", str(out / "metrics.json")]
    )  # fmt: skip
    assert code == 0, stderr
    row = next(line for line in stdout.splitlines() if line.startswith("CLIP score "))
    value, compared, difference = (float(v) for v in row.split()[-3:])
    assert value == compared == pytest.approx(data["clip"]["clip_score"], abs=5e-5)
    assert difference == 0


# -- the run's prompts and bad input ----------------------------------------------------------


def test_run_prompts_reads_the_manifest(world: dict[str, Any], tmp_path: Path) -> None:
    assert run_prompts(world["run"]) == world["prompts"]
    assert run_prompts(world["run"] / runs.SAMPLES) == world["prompts"]
    assert run_prompts(world["root"] / "plain.npz") is None
    bare = _write_run(tmp_path / "bare", world["images"][:2], {})
    assert run_prompts(bare) is None
    # a clip: guide's prompts on a class model (no family recorded: ADM) or on a family that
    # does not read prompts (a diffusers pipeline): its classes, not generation prompts
    for family in (None, "diffusers"):
        guided = _write_run(
            tmp_path / f"guided-{family}", world["images"][:2],
            {"classifier": "clip:/models/clip", "prompts": ["a cat", "a dog"]}, family,
        )  # fmt: skip
        assert run_prompts(guided) is None
    broken = _write_run(tmp_path / "broken", world["images"][:2], {"prompts": ["a", ""]})
    with pytest.raises(ValueError, match=r"manifest\.json: identity\.prompts must be a list"):
        run_prompts(broken)


def _one_line_error(argv: list[str]) -> str:
    try:
        code, stdout, stderr = _cli(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code, stderr = int(str(exit_info.code)), ""
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) <= 1, stderr
    return lines[0] if lines else ""


def test_no_prompts_is_refused_before_the_clip_folder_is_read(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ev"
    # the CLIP folder does not exist: the prompts are checked first, before any loading
    line = _one_line_error(
        ["evaluate", str(world["root"] / "plain.npz"), "--clip", str(tmp_path / "nowhere"),
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert "no generation prompts recorded" in line and "--clip-prompt TEXT" in line, line
    assert "plain.npz" in line and not out.exists()
    # a path that does not exist is named as missing, not as a run without prompts
    line = _one_line_error(
        ["evaluate", str(tmp_path / "no-run"), "--clip", str(world["clip"]), "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert "no-run: not found" in line and "generation prompts" not in line, line
    assert not out.exists()


@pytest.mark.parametrize("damage", ["missing", "no-weights", "bad-config"])
def test_a_bad_clip_folder_is_refused_before_out_is_claimed(
    world: dict[str, Any], tmp_path: Path, damage: str
) -> None:
    folder = tmp_path / "clip"
    if damage != "missing":
        folder.mkdir()
        for f in world["clip"].iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    if damage == "no-weights":
        (folder / "model.safetensors").unlink()
    if damage == "bad-config":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["vision_config"]["patch_size"] = -4
        (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ev"
    line = _one_line_error(
        ["evaluate", str(world["run"]), "--clip", str(folder), "--out", str(out), "--no-progress"]
    )
    assert line.startswith("fguide evaluate: error: --clip: "), line
    assert {"missing": "not found", "no-weights": "safetensors", "bad-config": "patch_size"}[
        damage
    ] in line
    assert not out.exists()


def test_requests_that_make_no_sense_are_refused(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, clip, out = str(world["run"]), str(world["clip"]), str(tmp_path / "ev")
    line = _one_line_error(["evaluate", run, "--out", out])
    assert "give REF SAMPLES" in line and "--clip FOLDER" in line
    line = _one_line_error(["evaluate", run, "--clip-prompt", "a cat", "--out", out])
    assert "--clip-prompt applies to the CLIP score" in line
    line = _one_line_error(["evaluate", run, "--clip", clip, "--compare", run, "--out", out])
    assert "--compare compares FID metrics: give REF too" in line
    for argv in (
        ["--clip-prompt", " "],
        ["--clip-prompt", "a", "--clip-prompt-file", "p.txt"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", run, "--clip", clip, "--out", out, *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--clip-prompt" in err[0], err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    line = _one_line_error(
        ["evaluate", run, "--clip", clip, "--clip-prompt-file", str(empty), "--out", out]
    )
    assert line.startswith("fguide evaluate: error: --clip-prompt-file") and "no prompts" in line
    assert not (tmp_path / "ev").exists()

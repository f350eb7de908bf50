"""Training and caching the digits world's four networks (see :mod:`fguide.worlds.digits`).

Every network is a function of (training settings, seed, code): the cache folder is named by
the SHA-256 of the canonical JSON of :meth:`DigitsConfig.training_key`, the training split's
fingerprint, fguide's version, torch's major.minor version and the source of the code that
determines the weights (this module; the data and network definitions of
:mod:`fguide.worlds.digits`): a change to the training code trains anew. It lives under
``$FGUIDE_CACHE_DIR/digits/`` or ``~/.cache/fguide/digits/``. Each network is written
atomically as a plain state dict; ``meta.json`` is written last and marks the folder
complete, so an interrupted training leaves no half-valid cache.

Determinism: every draw (initialisation, batch order, shifts, t, ε, dropout) comes from
generators seeded by (seed, network tag), and every network trains on one torch thread (in
its own worker process when there are several cores, :mod:`fguide.worlds.workers`), so a seed
gives the same weights whatever the machine's core count, with one torch build and CPU
instruction set (float summation order may differ across those).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fguide import rng as streams
from fguide.io.files import atomic_write, atomic_write_json
from fguide.models.loading import load_model
from fguide.models.presets import create_classifier, create_model, model_defaults
from fguide.schedules import Process, make_process
from fguide.worlds.digits import DigitsCNN, DigitsConfig, DigitsData, FeatureNet
from fguide.worlds.workers import job_pool, timed

__all__ = [
    "TrainedWorld",
    "load_unet",
    "training_process",
    "cache_dir",
    "cache_key",
    "data_fingerprint",
    "load_or_train",
    "train_network",
    "unet_model_flags",
]

FILES = {
    "unet": "unet.pt",
    "classifier": "clean_classifier.pt",
    "noisy_classifier": "noisy_classifier.pt",
    "feature_net": "feature_net.pt",
}
_TAGS = {"unet": 1, "classifier": 2, "noisy_classifier": 3, "feature_net": 4}
_FORMAT = "fguide-digits-cache/1"


@dataclass
class TrainedWorld:
    """The cached networks' files, the folder, and what this call trained."""

    folder: Path
    key: str
    files: dict[str, Path]
    trained: list[str]
    """Networks trained by this call (empty when the cache was reused)."""
    meta: dict[str, Any]


def unet_model_flags(config: DigitsConfig) -> dict[str, Any]:
    """The ``create_model`` subset of the UNet's flags (the rest are diffusion flags)."""
    return {k: v for k, v in config.unet.items() if k in model_defaults()}


def _code_hash() -> str:
    """SHA-256 of the code that determines the weights: this module (the training loops) and
    the data and network definitions of :mod:`fguide.worlds.digits` (not its sampling or
    report settings, so changing those reuses the trained networks)."""
    import inspect

    from fguide.worlds import digits

    h = hashlib.sha256(Path(__file__).read_bytes())
    for obj in (
        digits.DigitsData,
        digits.to_model_input,
        digits.split_digits,
        digits.load_digits_data,
        digits.DigitsCNN,
        digits.FeatureNet,
        digits.DigitsConfig.training_key,
    ):
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()


def data_fingerprint(data: DigitsData) -> str:
    """SHA-256 of the training split (indices, images, labels) the networks learn from."""
    h = hashlib.sha256()
    for arr in (data.train, data.images[data.train], data.labels[data.train]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def cache_key(config: DigitsConfig, data: DigitsData) -> str:
    """SHA-256 (hex, first 16) of the training settings and seed, the training data and the
    code version."""
    import fguide

    content = {
        "format": _FORMAT,
        "training": config.training_key(),
        "data": data_fingerprint(data),
        "fguide": fguide.__version__,
        "torch": ".".join(torch.__version__.split(".")[:2]),
        "code": _code_hash(),
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$FGUIDE_CACHE_DIR/digits``, else ``~/.cache/fguide/digits``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("FGUIDE_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "fguide") / "digits"


def _gen(seed: int, tag: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, tag]).generate_state(1)[0])
    )


def _batches(n: int, batch: int, steps: int, seed: int, tag: int) -> list[np.ndarray]:
    """Indices of each step: concatenated seeded permutations of range(n)."""
    rng = streams.numpy_rng(seed, tag, streams.DIGITS_BATCHES)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch // n) + 1)])
    return [order[k * batch : (k + 1) * batch] for k in range(steps)]


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translations by −1, 0 or +1 pixel per axis (zero-padded = background −1)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack(
        [padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]
    ).contiguous()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr)


def _train_unet(
    data: DigitsData, config: DigitsConfig, process: Process, show: bool
) -> dict[str, Tensor]:
    """ε-prediction MSE (ADM's L_simple) with t uniform over T, Adam; returns the EMA weights."""
    tag = _TAGS["unet"]
    _init_seed(config, "unet")
    net = create_model(**unet_model_flags(config)).train()  # init and dropout: global RNG
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.diffusion_lr)
    x_all = data.x(data.train)
    gen = _gen(config.seed, tag)
    T = process.num_steps
    bar = _progress(config.diffusion_steps, "training the diffusion model", show)
    for idx in _batches(len(x_all), config.train_batch, config.diffusion_steps, config.seed, tag):
        x0 = x_all[idx]
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(net(process.q_sample(x0, t, eps), t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - config.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return ema.state_dict()


def _train_classifier(
    net: nn.Module,
    data: DigitsData,
    config: DigitsConfig,
    name: str,
    steps: int,
    process: Process | None,
    show: bool,
) -> dict[str, Tensor]:
    """Cross-entropy with Adam on the training split: clean images with ±1-pixel shifts, or
    (``process`` given) x_t with t uniform over T and the timestep passed (ADM's classifier)."""
    tag = _TAGS[name]
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=config.classifier_lr)
    x_all, y_all = data.x(data.train), data.y(data.train)
    gen = _gen(config.seed, tag)
    bar = _progress(steps, f"training the {name.replace('_', ' ')}", show)
    for idx in _batches(len(x_all), config.train_batch, steps, config.seed, tag):
        x, y = _shift(x_all[idx], gen), y_all[idx]
        if process is None:
            logits = net(x)
        else:
            t = torch.randint(0, process.num_steps, (len(idx),), generator=gen)
            logits = net(process.q_sample(x, t, torch.randn(x.shape, generator=gen)), t)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return net.eval().state_dict()


def _save(path: Path, sd: dict[str, Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _init_seed(config: DigitsConfig, name: str) -> None:
    torch.manual_seed(
        int(np.random.SeedSequence([config.seed, _TAGS[name], 1]).generate_state(1)[0])
    )


def training_process(config: DigitsConfig) -> Process:
    """The unrespaced process the UNet is trained on (fixed-large variance, t in training steps)."""
    return make_process("linear", int(config.unet["diffusion_steps"]), "", "fixed_large")


def load_unet(world: TrainedWorld, config: DigitsConfig) -> nn.Module:
    """The trained UNet, frozen, for x̂0 estimates."""
    net = load_model(create_model(**unet_model_flags(config)), world.files["unet"])
    return net.eval().requires_grad_(False)


def _classifier_job(config: DigitsConfig, name: str) -> tuple[nn.Module, int, Process | None]:
    """(network, steps, noising process or None) of classifier ``name``."""
    if name == "classifier":
        return DigitsCNN(), config.classifier_steps, None
    if name == "noisy_classifier":
        net = create_classifier(**config.adm_classifier)
        return net, config.noisy_classifier_steps, training_process(config)
    return FeatureNet(), config.feature_steps, None


def train_network(
    name: str, data: DigitsData, config: DigitsConfig, path: Path, show: bool
) -> float:
    """Train network ``name`` (a key of :data:`FILES`) and write it to ``path`` atomically;
    returns the wall seconds. A job of its own (:mod:`fguide.worlds.workers`): its weights
    depend on the seed, the settings and the data only (one torch thread)."""
    t0 = time.perf_counter()
    if name == "unet":
        sd = _train_unet(data, config, training_process(config), show)
    else:
        _init_seed(config, name)  # before building: the initialisation draws from it
        net, steps, noise = _classifier_job(config, name)
        sd = _train_classifier(net, data, config, name, steps, noise, show)
    _save(path, sd)
    return time.perf_counter() - t0


def load_or_train(
    data: DigitsData,
    config: DigitsConfig,
    root: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    pool: Executor | None = None,
) -> TrainedWorld:
    """The four networks of ``config``: read from the cache, or trained and cached.

    Returns their files; ``trained`` lists what this call trained (empty: cache reused).
    The networks train as separate jobs of ``pool`` (default: one after another here), the
    diffusion model first; with worker processes only its progress bar is shown.
    """
    key = cache_key(config, data)
    folder = cache_dir(root) / key
    files = {name: folder / fname for name, fname in FILES.items()}
    meta_path = folder / "meta.json"
    if meta_path.is_file() and all(p.is_file() for p in files.values()):
        meta = json.loads(meta_path.read_text())
        if log:
            log(f"digits world: using the cached networks in {folder}")
        return TrainedWorld(folder, key, files, [], meta)
    if log:
        log(f"digits world: training the networks into {folder} (once per configuration)")
    folder.mkdir(parents=True, exist_ok=True)
    inline = pool is None or not isinstance(pool, ProcessPoolExecutor)
    with job_pool(1) if pool is None else nullcontext(pool) as jobs:
        futures = {
            name: jobs.submit(
                timed,
                train_network,
                name,
                data,
                config,
                files[name],
                progress and (inline or name == "unet"),
            )
            for name in FILES
        }
        done = {name: f.result() for name, f in futures.items()}
    meta = {
        "format": _FORMAT,
        "key": key,
        "training": config.training_key(),
        "train_seconds": {k: round(wall, 2) for k, (wall, _) in done.items()},
        "train_cpu_seconds": {k: round(cpu, 2) for k, (_, cpu) in done.items()},
        "torch_threads": 1,
        "files": {name: p.name for name, p in files.items()},
    }
    atomic_write_json(meta_path, meta)
    return TrainedWorld(folder, key, files, list(FILES), meta)

"""Where the weight files come from: one table of every file a named configuration
(:mod:`fguide.sampling.configs`) or ``fguide evaluate`` needs, and finding them in a folder.

Each :class:`WeightEntry` is a file or a folder (a Hugging Face repository's files in the
layout fguide loads: safetensors and configs, never pickled ``.bin``) under the name
``--weights-dir`` looks for. Each :class:`RemoteFile` holds its official URL and, where a public
source states them, its size in bytes and SHA-256; ``None`` means no public source was found
(``fguide weights list`` shows "unknown" and ``fguide weights download`` needs
``--allow-unverified`` for it). The comment above each entry says where its numbers come from.
Downloading is :mod:`fguide.weights_download`.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fguide.sampling.configs import PAPER_CONFIGS, paper_config

__all__ = [
    "EVALUATE",
    "REGISTRY",
    "RemoteFile",
    "WeightEntry",
    "download_command",
    "entries_for",
    "missing_files",
    "model_required_message",
    "resolve_inception",
    "weights_dir_overrides",
]

#: The name under which ``fguide evaluate``'s Inception weights are "needed by".
EVALUATE = "fguide evaluate"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its path inside the entry, official URL, size and SHA-256."""

    path: str
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class WeightEntry:
    """A weight file or folder fguide loads, under the name ``--weights-dir`` looks for.

    ``role`` says what it is for a configuration: ``model`` (``--model``), ``classifier``
    (``--classifier-weights``), ``clip`` (``--guide clip:FOLDER``) or ``inception``
    (``fguide evaluate --inception-weights``). ``local_only`` lists files the entry needs that
    no official source publishes in a form fguide loads, each with how to make it.
    """

    name: str
    role: str
    files: tuple[RemoteFile, ...]
    folder: bool = False
    local_only: tuple[tuple[str, str], ...] = ()
    note: str = ""

    @property
    def configs(self) -> tuple[str, ...]:
        """The configurations (or ``fguide evaluate``) that need this entry."""
        if self.role == "inception":
            return (EVALUATE,)
        return tuple(n for n, c in PAPER_CONFIGS.items() if self.name in (c.model_file, c.weights))

    def target(self, root: Path, f: RemoteFile) -> Path:
        """Where ``f`` goes under the folder ``root``."""
        return root / self.name / f.path if self.folder else root / self.name


_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"
_TV = "https://download.pytorch.org/models"
# facebook/DiT-XL-2-256's main branch holds pickled .bin weights only; its pull request #1
# (refs/pr/1, commit 32d0e355…) adds the safetensors files, so the folder is pinned there.
_DIT = (
    "https://huggingface.co/facebook/DiT-XL-2-256/resolve/32d0e3550d47bdf75c5092db378c0f32cd12e100"
)
# The commit "add model" of openai/clip-vit-large-patch14-336, whose file list and small-file
# sizes its public tree page shows.
_CLIP = (
    "https://huggingface.co/openai/clip-vit-large-patch14-336/resolve/"
    "a2ab452d41e630fda015a7ad3e9751aa74081239"
)
# openai/clip-vit-large-patch14 at its main commit 32bd642…, which has model.safetensors.
_CLIP_L14 = (
    "https://huggingface.co/openai/clip-vit-large-patch14/resolve/"
    "32bd64288804d66eefd0ccbe215aa642df71cc41"
)
_CLIP_CONVERT = (
    "the official repository publishes the CLIP weights only as pickles (pytorch_model.bin, "
    "SHA-256 c6032c2e0caae3dc2d4fba35535fa6307dbb49df59c7e182b1bc4b3329b81801; tf_model.h5), "
    "which fguide never loads: write model.safetensors once where you trust that file, e.g. "
    'python -c "from transformers import CLIPModel; CLIPModel.from_pretrained('
    "'openai/clip-vit-large-patch14-336').save_pretrained('{folder}')\""
)


# stable-diffusion-v1-5/stable-diffusion-v1-5 (the maintained copy of runwayml's repository,
# which has the same history): its main commit 451f4fe…, as public Hugging Face cache listings
# of both repositories show it.
_SD15 = (
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/"
    "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
)
# stabilityai/stable-diffusion-xl-base-1.0 at its main commit 462165…, the revision public
# manifests read its files' LFS SHA-256 at.
_SDXL = (
    "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/"
    "462165984030d82259a11f4367a4eed129e94a7b"
)
_SD_NOTE = (
    "a Stable Diffusion{xl} pipeline folder in the diffusers layout: model_index.json, unet/, "
    "vae/, text_encoder/, tokenizer/, scheduler/{more}; fp32 safetensors only"
)
# A tokenizer folder's files (CLIP's BPE tokenizer, as the pipelines save it).
_TOKENIZER = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def _file(name: str, role: str, url: str, size: int | None, sha256: str | None) -> WeightEntry:
    return WeightEntry(name, role, (RemoteFile(name, url, size, sha256),))


def _folder(
    name: str,
    base: str,
    files: Iterable[tuple[str, int | None, str | None]],
    note: str = "",
    role: str = "model",
) -> WeightEntry:
    """A Hugging Face folder entry: each (path, size, SHA-256) fetched from ``base/path``."""
    remote = tuple(RemoteFile(p, f"{base}/{p}", size, sha) for p, size, sha in files)
    return WeightEntry(name, role, remote, folder=True, note=note)


_ENTRIES = (
    # openai/guided-diffusion's README gives the URLs of its checkpoints; no checksum or exact
    # size of 128x128_diffusion.pt or 128x128_classifier.pt was found in a public source.
    _file("128x128_diffusion.pt", "model", f"{_ADM}/128x128_diffusion.pt", None, None),
    _file("128x128_classifier.pt", "classifier", f"{_ADM}/128x128_classifier.pt", None, None),
    # SHA-256: Disco Diffusion's diff_model_map (alembics/disco-diffusion), which checks
    # downloads of this URL against it; the same SHA-256 with 2,211,383,297 bytes in
    # independent checkpoint manifests of this file, and in the Git LFS pointer of
    # huggingface.co/ydshieh/256x256_diffusion_uncond_from_blended_diffusion.
    _file(
        "256x256_diffusion_uncond.pt",
        "model",
        f"{_ADM}/256x256_diffusion_uncond.pt",
        2_211_383_297,
        "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1",
    ),
    # NVlabs/edm's README gives the URL; no checksum or exact size found in a public source.
    _file(
        "edm-imagenet-64x64-cond-adm.pkl",
        "model",
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl",
        None,
        None,
    ),
    # torchvision's IMAGENET1K_V2 files; a file name's 8 hex digits are the first 8 of its
    # SHA-256 (torch.hub's check_hash). Full SHA-256 and size as pinned, with those URLs, by
    # several public projects (e.g. "CHECKPOINT_SIZE = 102540417" beside this SHA-256).
    _file(
        "resnet50-11ad3fa6.pth",
        "classifier",
        f"{_TV}/resnet50-11ad3fa6.pth",
        102_540_417,
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
    ),
    # Full SHA-256 as pinned by two independent public projects ("official file checked
    # locally"), consistent with the cd907fc2 prefix; no public source for the exact size.
    _file(
        "resnet101-cd907fc2.pth",
        "classifier",
        f"{_TV}/resnet101-cd907fc2.pth",
        None,
        "cd907fc2a0de2292b2ba2b27d2216bc672d84632d1cf20058d01c0c03b5e020e",
    ),
    # The 2015-12-05 Inception graph ported by pytorch-fid (mirrored by torch-fidelity as
    # weights-inception-2015-12-05-6726825d.pth, the same bytes): SHA-256 and 95,628,359 bytes
    # as pinned by public projects for both names; consistent with the 6726825d prefix.
    _file(
        "pt_inception-2015-12-05-6726825d.pth",
        "inception",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        95_628_359,
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    ),
    # DiT-XL-2-256 (diffusers layout). The two safetensors: the Git LFS pointers (oid sha256,
    # size) shown in huggingface.co/facebook/DiT-XL-2-256/discussions/1/files. The JSON files
    # are plain Git files (no SHA-256 published); exact sizes from the repository's tree pages
    # where shown in bytes. Weights first, model_index.json (what marks a pipeline) last.
    WeightEntry(
        "DiT-XL-2-256",
        "model",
        (
            RemoteFile(
                "transformer/diffusion_pytorch_model.safetensors",
                f"{_DIT}/transformer/diffusion_pytorch_model.safetensors",
                2_999_370_408,
                "2dda994f0d26fc681ff763121eea321fa936a47bddf87178d4622e639df17603",
            ),
            RemoteFile(
                "vae/diffusion_pytorch_model.safetensors",
                f"{_DIT}/vae/diffusion_pytorch_model.safetensors",
                334_643_276,
                "32db726da04f06c1b6b14c0043ce115cc87a501482945c5add89a40d838fcb46",
            ),
            RemoteFile("transformer/config.json", f"{_DIT}/transformer/config.json", 602),
            RemoteFile("vae/config.json", f"{_DIT}/vae/config.json", 601),
            RemoteFile(
                "scheduler/scheduler_config.json", f"{_DIT}/scheduler/scheduler_config.json", 310
            ),
            RemoteFile("model_index.json", f"{_DIT}/model_index.json"),
        ),
        folder=True,
    ),
    # clip-vit-large-patch14-336: the configuration and tokenizer files of the "add model"
    # commit (plain Git files: no SHA-256 published; exact sizes where the tree page shows
    # bytes). config.json (what fguide checks first) last.
    WeightEntry(
        "clip-vit-large-patch14-336",
        "clip",
        (
            RemoteFile("vocab.json", f"{_CLIP}/vocab.json"),
            RemoteFile("merges.txt", f"{_CLIP}/merges.txt"),
            RemoteFile("tokenizer.json", f"{_CLIP}/tokenizer.json"),
            RemoteFile("tokenizer_config.json", f"{_CLIP}/tokenizer_config.json", 844),
            RemoteFile("special_tokens_map.json", f"{_CLIP}/special_tokens_map.json", 389),
            RemoteFile("preprocessor_config.json", f"{_CLIP}/preprocessor_config.json", 316),
            RemoteFile("config.json", f"{_CLIP}/config.json"),
        ),
        folder=True,
        local_only=(("model.safetensors", _CLIP_CONVERT),),
    ),
    # clip-vit-large-patch14 (the SD configurations' ViT-L/14 guide, --guide clip:FOLDER; also
    # what reward:FOLDER:HEAD embeds with). model.safetensors: size and SHA-256 at this commit
    # in a public download table; the same SHA-256 pinned at this commit by independent public
    # manifests and as the file's blob name in a public Hugging Face cache. The tokenizer
    # files: sizes and SHA-256 of a public inventory read from a cache of this commit, the same
    # SHA-256 in independent manifests (one from 2022: the files are unchanged). config.json and
    # preprocessor_config.json: SHA-256 pinned at this commit by two public manifests, the
    # preprocessor's byte count (316) as its content, identical in other CLIP repositories.
    _folder(
        "clip-vit-large-patch14",
        _CLIP_L14,
        (
            (
                "model.safetensors",
                1_710_540_580,
                "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb",
            ),
            (
                "vocab.json",
                961_143,
                "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
            ),
            (
                "merges.txt",
                524_619,
                "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
            ),
            (
                "tokenizer.json",
                2_224_003,
                "a83e0809aa4c3af7208b2df632a7a69668c6d48775b3c3fe4e1b1199d1f8b8f4",
            ),
            (
                "tokenizer_config.json",
                905,
                "deef455e52fa5e8151e339add0582e4235f066009601360999d3a9cda83b1129",
            ),
            (
                "special_tokens_map.json",
                389,
                "f8c0d6c39aee3f8431078ef6646567b0aba7f2246e9c54b8b99d55c22b707cbf",
            ),
            (
                "preprocessor_config.json",
                316,
                "910e70b3956ac9879ebc90b22fb3bc8a75b6a0677814500101a4c072bd7857bd",
            ),
            (
                "config.json",
                None,
                "8a09b467700c58138c29d53c605b34ebc69beaadd13274a8a2af8ad2c2f4032a",
            ),
        ),
        "CLIP ViT-L/14, the guide the Stable Diffusion configurations suggest: --guide "
        "clip:FOLDER, or reward:FOLDER:HEAD",
        role="clip",
    ),
    # stable-diffusion-v1-5: the files of the folder fguide loads (never safety_checker/,
    # feature_extractor/, .bin or fp16 files). Weights' SHA-256 and sizes: pinned alike by
    # independent public manifests (one read from the Hub's API, one from the file API of
    # ModelScope's mirror) and a public hash table; the VAE's SHA-256 is also its blob name in a
    # public Hugging Face cache listing of this commit, and the sizes are also those of a public
    # Hub API file listing. The other files are plain Git files (no SHA-256): their byte counts
    # from that cache listing.
    _folder(
        "stable-diffusion-v1-5",
        _SD15,
        (
            (
                "unet/diffusion_pytorch_model.safetensors",
                3_438_167_540,
                "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1",
            ),
            (
                "vae/diffusion_pytorch_model.safetensors",
                334_643_276,
                "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
            ),
            (
                "text_encoder/model.safetensors",
                492_265_874,
                "d008943c017f0092921106440254dbbe00b6a285f7883ec8ba160c3faad88334",
            ),
            ("unet/config.json", 743, None),
            ("vae/config.json", 547, None),
            ("text_encoder/config.json", 617, None),
            *(
                (f"tokenizer/{f}", size, None)
                for f, size in zip(_TOKENIZER, (1_059_962, 524_619, 472, 806), strict=True)
            ),
            ("scheduler/scheduler_config.json", 308, None),
            ("model_index.json", 541, None),
        ),
        _SD_NOTE.format(xl="", more=""),
    ),
    # stable-diffusion-xl-base-1.0: the text encoders' and the VAE's SHA-256 pinned alike by
    # independent public manifests (the VAE's by one that read it from the Hub at this commit,
    # and it is the blob name of the same VAE in a public cache listing); sizes from a public
    # Hub API file listing, the same in a public manifest. The UNet's SHA-256 is in only one
    # public hash table (357650fb…), with no second source: left unknown. Config and tokenizer
    # files are plain Git files (no SHA-256; a size found only for vocab.json).
    _folder(
        "stable-diffusion-xl-base-1.0",
        _SDXL,
        (
            ("unet/diffusion_pytorch_model.safetensors", 10_270_077_736, None),
            (
                "vae/diffusion_pytorch_model.safetensors",
                334_643_268,
                "1598f3d24932bcfe6634e8b618ea1e30ab1d57f5aad13a6d2de446d2199f2341",
            ),
            (
                "text_encoder/model.safetensors",
                492_265_168,
                "5c3d6454dd2d23414b56aa1b5858a72487a656937847b6fea8d0606d7a42cdbc",
            ),
            (
                "text_encoder_2/model.safetensors",
                2_778_702_264,
                "3a6032f63d37ae02bbc74ccd6a27440578cd71701f96532229d0154f55a8d3ff",
            ),
            *(
                (f"{comp}/config.json", None, None)
                for comp in ("unet", "vae", "text_encoder", "text_encoder_2")
            ),
            *(
                (f"{tok}/{f}", 1_059_962 if f == "vocab.json" else None, None)
                for tok in ("tokenizer", "tokenizer_2")
                for f in _TOKENIZER
            ),
            ("scheduler/scheduler_config.json", None, None),
            ("model_index.json", None, None),
        ),
        _SD_NOTE.format(xl=" XL", more=", text_encoder_2/, tokenizer_2/"),
    ),
)

REGISTRY: dict[str, WeightEntry] = {e.name: e for e in _ENTRIES}
"""Every weight file or folder fguide's configurations and evaluation use, by name."""


def entries_for(
    names: Iterable[str], registry: Mapping[str, WeightEntry] | None = None
) -> list[WeightEntry]:
    """The entries named, in order and once each; a configuration name stands for its files."""
    reg = REGISTRY if registry is None else registry
    out: dict[str, WeightEntry] = {}
    for name in names:
        if name in reg:
            out[name] = reg[name]
        elif name in PAPER_CONFIGS:
            out.update((e.name, e) for e in reg.values() if name in e.configs)
        else:
            raise ValueError(
                f"unknown weight file or configuration {name!r}; valid: "
                f"{', '.join(reg)} or a configuration ({', '.join(PAPER_CONFIGS)})"
            )
    return list(out.values())


def missing_files(entry: WeightEntry, root: Path) -> list[str]:
    """The paths under ``root`` that ``entry`` needs and that are not there (a folder that
    is not there at all counts as one path)."""
    if entry.folder and not (root / entry.name).is_dir():
        return [str(root / entry.name)]
    paths = [entry.target(root, f) for f in entry.files]
    paths += [root / entry.name / p for p, _ in entry.local_only]
    return [str(p) for p in paths if not p.is_file()]


def download_command(names: Iterable[str], weights_dir: Path) -> str:
    """The ``fguide weights download`` command line that fetches ``names`` into the folder."""
    return shlex.join(["fguide", "weights", "download", *names, "--dir", str(weights_dir)])


def _check_present(entries: list[WeightEntry], weights_dir: Path, needed_by: str) -> None:
    """Raise one line naming every missing file and how to get it (the download command, or
    how to make a file no official source publishes in a loadable form)."""
    fetch = [
        e.name for e in entries if any(not e.target(weights_dir, f).is_file() for f in e.files)
    ]
    notes = [
        note.format(folder=weights_dir / e.name)
        for e in entries
        for p, note in e.local_only
        if not (weights_dir / e.name / p).is_file()
    ]
    absent = [p for e in entries for p in missing_files(e, weights_dir)]
    if not absent:
        return
    it = "it" if len(fetch) == 1 else "them"
    how = [f"get {it} with: {download_command(fetch, weights_dir)}"] if fetch else []
    raise FileNotFoundError(
        f"--weights-dir {weights_dir}: {', '.join(absent)} not found (needed by {needed_by}); "
        + "; ".join(how + notes)
    )


def weights_dir_overrides(
    config: str | None, weights_dir: Path, given: Mapping[str, Any]
) -> dict[str, Any]:
    """The configuration's files found in ``weights_dir`` by name, as ``fguide sample``
    arguments: ``model``, ``classifier_weights`` or ``classifier`` (``clip:FOLDER``), each
    only where ``given`` (the explicit arguments) leaves it ``None``. A missing file raises
    ``FileNotFoundError`` naming it and the ``fguide weights download`` command.
    """
    if config is None:
        raise ValueError("--weights-dir needs --config NAME (it finds that configuration's files)")
    named = paper_config(config)
    if not weights_dir.is_dir():
        raise FileNotFoundError(
            f"--weights-dir {weights_dir}: not a folder; fill it with: "
            + download_command([config], weights_dir)
        )
    wanted = {"model": named.model_file, "guide": named.weights}
    entries = [REGISTRY[n] for n in wanted.values() if n is not None]
    roles = {
        "model": "model",
        "classifier": "classifier_weights",
        "clip": "classifier",
    }
    todo = [e for e in entries if given.get(roles[e.role]) is None]
    _check_present(todo, weights_dir, f"--config {config}")
    out: dict[str, Any] = {}
    for e in todo:
        path = weights_dir / e.name
        out[roles[e.role]] = f"clip:{path}" if e.role == "clip" else path
    return out


def model_required_message(config: str | None) -> str:
    """The one-line error of ``fguide sample`` given no ``--model``: with a configuration that
    names its model file or folder, what that is and the command that fetches it."""
    model_file = None if config is None else paper_config(config).model_file
    entry = REGISTRY.get(model_file) if model_file is not None else None
    if entry is None:
        return "--model is required (the diffusion checkpoint)"
    what = f" ({entry.note})" if entry.note else ""
    kind = "FOLDER" if entry.folder else "FILE"
    return (
        f"--model is required: --config {config} loads {entry.name}{what}; give --model {kind}, "
        f"or get it with: {download_command([entry.name], Path('DIR'))} and add --weights-dir DIR"
    )


def resolve_inception(explicit: Path | None, weights_dir: Path | None) -> Path | None:
    """``fguide evaluate``'s Inception weight file: ``explicit`` if given, else the registry's
    file (or torch-fidelity's copy of it) in ``weights_dir``, else ``None`` (the environment
    variable). A folder without either raises ``FileNotFoundError`` with the download command.
    """
    if explicit is not None or weights_dir is None:
        return explicit
    entry = next(e for e in REGISTRY.values() if e.role == "inception")
    alternate = weights_dir / "weights-inception-2015-12-05-6726825d.pth"
    if not (weights_dir / entry.name).is_file() and alternate.is_file():
        return alternate
    _check_present([entry], weights_dir, EVALUATE)
    return weights_dir / entry.name

"""Safe loading of NVlabs network pickles (tests/reference/*.pkl, pickled by NVlabs' own code).

The malicious pickles below are built in the test; where a payload would run under ordinary
unpickling, the test first shows that it does (the marker file appears), then that fguide's
loader refuses the pickle (or ignores the embedded source) and the marker never appears.
"""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tolerances
import torch
from fixture_utils import fixture_init

from fguide.models.edm import EDMDenoiser, EDMPrecond
from fguide.models.loading import UnsafeCheckpointError, load_state_dict_file
from fguide.models.nvlabs import (
    UnsafePickleError,
    UnsupportedNetworkError,
    is_network_pickle,
    load_edm_denoiser,
    load_network_pickle,
)

HERE = Path(__file__).parent / "reference"
DATA: dict[str, Any] = torch.load(HERE / "edm_reference.pt", weights_only=True)
CASES = {c["name"]: c for c in DATA["pickle"]}


def _close32(actual: torch.Tensor, expected: torch.Tensor, net: torch.nn.Module) -> None:
    """A float32 EDM network against NVlabs' own float32 output."""
    tolerances.assert_close(actual, expected, torch.float32, tolerances.network_depth(net))


@pytest.mark.parametrize("name", sorted(CASES))
def test_nvlabs_pickle_loads_as_fguide_network(name: str) -> None:
    """Bare network and training snapshot: fguide's EDMPrecond, NVlabs' weights and output."""
    case = CASES[name]
    assert is_network_pickle(HERE / name)
    net, info = load_network_pickle(HERE / name)
    assert type(net) is EDMPrecond and not net.training
    assert info["class_name"] == "EDMPrecond" and info["model_type"] == "DhariwalUNet"
    assert info["init_kwargs"] == case["init_kwargs"]
    assert net.use_fp16 and net.label_dim == 4
    if case["snapshot_keys"] is None:
        assert info["snapshot_keys"] is None and info["other_objects"] == {}
    else:
        assert info["snapshot_keys"] == case["snapshot_keys"]
        assert info["other_objects"] == {
            "loss_fn": "EDMLoss",
            "augment_pipe": "AugmentPipe",
            "dataset_kwargs": "dict",
        }
    # Every tensor landed under its own name: the generator's weight rule, key by key.
    sd = net.state_dict()
    assert any(k.endswith("resample_filter") for k in sd)
    for k, v in sd.items():
        if not k.endswith("resample_filter"):
            assert torch.equal(v, fixture_init(k, tuple(v.shape), case["seed"]).float())
    with torch.no_grad():
        out = net(case["x"], case["sigma"], torch.eye(4)[case["labels"]])
    _close32(out, case["expected_float32"], net)
    den, _ = load_edm_denoiser(HERE / name)
    assert isinstance(den, EDMDenoiser)
    with torch.no_grad():
        _close32(den(case["x"], case["sigma"], case["labels"]), case["expected_float32"], net)


# -- malicious and unsupported pickles ---------------------------------------------------------


class _Reduce:
    """Pickles as ``fn(*args)``: what a hostile ``__reduce__`` does."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


@pytest.fixture
def nvlabs_like(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], Any]:
    """A stand-in ``torch_utils.persistence`` with NVlabs' semantics: it executes module_src."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:
        exec(meta["module_src"], {})  # what persistence._src_to_module does
        return meta

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    pkg.persistence = mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return _reconstruct_persistent_obj


def _write(path: Path, obj: Any) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()\n"


@pytest.mark.parametrize(
    ("fn", "name"), [(builtins.exec, "builtins.exec"), (builtins.eval, "builtins.eval")]
)
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in_snapshot"])
def test_reduce_to_code_is_refused(tmp_path: Path, fn: Any, name: str, wrapped: bool) -> None:
    marker = tmp_path / "marker"
    code = _marker_code(marker)
    if fn is builtins.eval:
        code = f"open({str(marker)!r}, 'w').close()"
    evil: Any = _Reduce(fn, code)
    path = _write(tmp_path / "evil.pkl", {"ema": evil, "loss_fn": None} if wrapped else evil)
    pickle.loads(path.read_bytes())  # ordinary unpickling runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")) as err:
        load_network_pickle(path)
    assert isinstance(err.value, UnsafeCheckpointError) and str(path) in str(err.value)
    assert not marker.exists()


def test_reduce_to_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _write(tmp_path / "evil.pkl", _Reduce(os.system, f"touch {marker}"))
    with pytest.raises(UnsafePickleError, match=r"\.system"):
        load_network_pickle(path)
    assert not marker.exists()


def test_unknown_embedded_class_is_refused(
    tmp_path: Path, nvlabs_like: Callable[[dict[str, Any]], Any]
) -> None:
    marker = tmp_path / "marker"
    meta = {
        "type": "class",
        "version": 6,
        "module_src": _marker_code(marker) + "class Backdoor: pass\n",
        "class_name": "Backdoor",
        "state": {},
    }
    path = _write(tmp_path / "backdoor.pkl", {"ema": _Reduce(nvlabs_like, meta)})
    pickle.loads(path.read_bytes())  # NVlabs' unpickling would run the embedded source
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match="unknown class 'Backdoor'"):
        load_network_pickle(path)
    assert not marker.exists()


def _swap_source(data: bytes, new_src: str) -> bytes:
    """Replace the embedded module source by a payload of the same byte length."""
    for op, arg, pos in pickletools.genops(data):
        if op.name == "BINUNICODE" and isinstance(arg, str) and "class EDMPrecond" in arg:
            old = arg.encode("utf-8")
            new = new_src.encode("utf-8")
            assert len(new) <= len(old)
            new = new + b"#" * (len(old) - len(new))
            assert pos is not None
            start = pos + 5  # opcode byte + 4-byte length
            assert data[start : start + len(old)] == old
            return data[:start] + new + data[start + len(old) :]
    raise AssertionError("no embedded source found")


def test_embedded_source_of_a_known_class_is_never_run(
    tmp_path: Path, nvlabs_like: Callable[[dict[str, Any]], Any]
) -> None:
    """The real NVlabs pickle with its source replaced by a payload: loads, payload never runs."""
    marker = tmp_path / "marker"
    data = _swap_source((HERE / "edm_tiny_bare.pkl").read_bytes(), _marker_code(marker))
    path = tmp_path / "trojan.pkl"
    path.write_bytes(data)
    pickle.loads(data)  # NVlabs' unpickling executes module_src
    assert marker.exists()
    marker.unlink()
    net, info = load_network_pickle(path)
    assert not marker.exists()
    case = CASES["edm_tiny_bare.pkl"]
    with torch.no_grad():
        out = net(case["x"], case["sigma"], torch.eye(4)[case["labels"]])
    _close32(out, case["expected_float32"], net)
    _, clean = load_network_pickle(HERE / "edm_tiny_bare.pkl")
    assert info["embedded_source_sha256"] != clean["embedded_source_sha256"]


@pytest.mark.parametrize(
    ("class_name", "what"), [("VPPrecond", "VP model"), ("iDDPMPrecond", "iDDPM")]
)
def test_unsupported_network_is_named(
    tmp_path: Path, nvlabs_like: Callable[[dict[str, Any]], Any], class_name: str, what: str
) -> None:
    meta = {"type": "class", "version": 6, "module_src": "", "class_name": class_name}
    meta["state"] = {"_init_kwargs": {}, "_modules": {}}
    path = _write(tmp_path / "vp.pkl", {"ema": _Reduce(nvlabs_like, meta)})
    with pytest.raises(UnsupportedNetworkError, match=f"'{class_name}'.*{what}"):
        load_network_pickle(path)


def test_state_dict_loader_points_to_the_pickle_loader() -> None:
    with pytest.raises(UnsafeCheckpointError, match="load_network_pickle"):
        load_state_dict_file(HERE / "edm_tiny_snapshot.pkl")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_network_pickle(tmp_path / "missing.pkl")
    data = (HERE / "edm_tiny_snapshot.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafePickleError, match="cut.pkl"):
        load_network_pickle(tmp_path / "cut.pkl")
    _write(tmp_path / "nokey.pkl", {"net": 1})
    assert not is_network_pickle(tmp_path / "nokey.pkl")
    with pytest.raises(UnsupportedNetworkError, match=r"without the key 'ema'.*\['net'\]"):
        load_network_pickle(tmp_path / "nokey.pkl")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    assert not is_network_pickle(tmp_path / "state.pt")
    with pytest.raises(UnsafePickleError):
        load_network_pickle(tmp_path / "state.pt")

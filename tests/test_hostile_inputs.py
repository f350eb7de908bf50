"""Hostile and malformed NVlabs pickles: each is refused in one error naming the file, without
running anything, within bounded memory (issue 22 §1 and §2).

Every pickle is built here. Most start from the real NVlabs pickle ``edm_tiny_bare.pkl``, read
with a trusted stand-in for ``torch_utils.persistence`` (records become :class:`_Rec`), edited
and pickled again; what Python's pickler cannot write (a list nested thousands deep, a dict
changed after the record that holds it) is written as raw opcodes (:class:`_Raw`).

The cases that exhausted memory or time before are loaded in a separate worker process that
reports the error, the peak of Python allocations (tracemalloc) and the growth of the peak
resident size; a case that takes more than a minute fails (a hang guard, not a speed claim).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fguide.models.nvlabs import UnsafePickleError, load_network_pickle

HERE = Path(__file__).parent / "reference"
REF = HERE / "edm_tiny_bare.pkl"
CASES = {c["name"]: c for c in torch.load(HERE / "edm_reference.pt", weights_only=True)["pickle"]}
MiB = 1 << 20


def _close32(actual: torch.Tensor, case: dict[str, Any]) -> None:
    """float32 against NVlabs' float32 output (as tests/test_models_nvlabs.py compares)."""
    expected = case["expected_float32"]
    atol = 1e-5 + 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


# -- building NVlabs-like pickles ---------------------------------------------------------------


class _Rec:
    """An NVlabs persistent object as NVlabs pickles it: ``_reconstruct_persistent_obj(meta)``;
    ``build``: a state that a BUILD opcode then sets on the record."""

    def __init__(self, meta: dict[str, Any], build: Any = None):
        self.meta, self.build = meta, build

    def __reduce__(self) -> tuple[Any, ...]:
        out = (_reconstruct_persistent_obj, (self.meta,))
        return out if self.build is None else (*out, self.build)


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> _Rec:
    return _Rec(meta)


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_PERSISTENCE = types.ModuleType("torch_utils.persistence")
_PERSISTENCE._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _persistence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trusted ``torch_utils.persistence`` that keeps records as :class:`_Rec` (never runs
    module_src), so that the tests can read, edit and write NVlabs pickles."""
    pkg = types.ModuleType("torch_utils")
    pkg.persistence = _PERSISTENCE  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", _PERSISTENCE)


class _Reduce:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


class _Raw:
    """Opcodes written as they are: ``emit(pickler)`` must leave exactly one object."""

    def __init__(self, emit: Callable[[Any], None]):
        self.emit = emit


class _RawPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is open
    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[_Raw] = lambda self, obj: obj.emit(self)


def _dump(obj: Any) -> bytes:
    f = io.BytesIO()
    _RawPickler(f, protocol=4).dump(obj)
    return f.getvalue()


def _tiny() -> _Rec:
    """A fresh editable copy of the real NVlabs pickle (a bare EDMPrecond)."""
    rec = pickle.loads(REF.read_bytes())
    assert isinstance(rec, _Rec)
    return rec


def _unet(root: _Rec) -> _Rec:
    inner = root.meta["state"]["_modules"]["model"]
    assert isinstance(inner, _Rec)
    return inner


def _meta(class_name: str, state: dict[str, Any], src: Any = "") -> dict[str, Any]:
    return {"type": "class", "version": 6, "module_src": src, "class_name": class_name,
            "state": state}  # fmt: skip


def _list_bomb(levels: int = 40) -> list[Any]:
    """2**levels paths through ``levels`` shared lists (a few hundred bytes pickled)."""
    bomb: list[Any] = [1]
    for _ in range(levels):
        bomb = [bomb, bomb]
    return bomb


def _deep_list(depth: int) -> _Raw:
    """``[[[...]]]`` nested ``depth`` deep: ``depth`` MARKs, an empty list, ``depth`` LISTs."""
    return _Raw(lambda p: p.write(b"(" * depth + b"]" + b"l" * depth))


def _storage_blob(declared: int, payload: bytes, storage: Any = torch.FloatStorage) -> bytes:
    """A legacy ``torch.save`` of one storage (what ``torch.storage._load_from_bytes`` reads)
    declaring ``declared`` elements and holding ``payload``."""
    f = io.BytesIO()
    info = {"protocol_version": 1001, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    for obj in (0x1950A86A20F9469CFC6C, 1001, info):
        pickle.dump(obj, f, protocol=2)
    key = object()

    class _IdPickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("storage", storage, "0", "cpu", declared, None) if obj is key else None

    _IdPickler(f, protocol=2).dump(key)
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", declared) + payload)
    return f.getvalue()


def _storage(declared: int, payload: bytes) -> _Reduce:
    return _Reduce(torch.storage._load_from_bytes, _storage_blob(declared, payload))


def _view(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> _Reduce:
    return _Reduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False,
                   OrderedDict())  # fmt: skip


def _tuple_bomb_key(levels: int = 40) -> _Raw:
    """``{t: 1}`` with ``t`` a tuple of 2**levels paths: hashing it never ends (written as
    opcodes: building the dict here would hash it)."""
    t: tuple[Any, ...] = (1,)
    for _ in range(levels):
        t = (t, t)

    def emit(p: Any) -> None:
        p.write(pickle.EMPTY_DICT)
        p.save(t)
        p.save(1)
        p.write(pickle.SETITEM)

    return _Raw(emit)


def test_storage_blob_builder_is_what_torch_writes() -> None:
    """The blob builder above writes torch's own format: torch reads it back exactly."""
    values = torch.arange(5, dtype=torch.float32)
    blob = _storage_blob(5, values.numpy().tobytes())
    storage = torch.load(io.BytesIO(blob), weights_only=True)
    assert torch.equal(torch.tensor(storage.tolist()), values)


# -- the worker: loads a file in its own process, reports error, memory ------------------------

_WORKER = r"""
import json, resource, sys, tracemalloc
from fguide.models.loading import load_state_dict_file
from fguide.models.nvlabs import load_network_pickle
loaders = {"nvlabs": load_network_pickle, "state_dict": load_state_dict_file}
load_network_pickle(sys.argv[1])  # warm-up: lazy imports and first-use allocations
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
tracemalloc.start()
print("ready", flush=True)
for line in sys.stdin:
    loader, path = json.loads(line)
    before = resource.getrusage(resource.RUSAGE_SELF)
    tracemalloc.reset_peak()
    try:
        loaders[loader](path)
        out = {"error": None, "message": ""}
    except Exception as err:
        out = {"error": type(err).__name__, "message": str(err),
               "user_error": isinstance(err, (ValueError, OSError))}
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["py_peak"] = tracemalloc.get_traced_memory()[1]
    out["rss_growth"] = (after.ru_maxrss - before.ru_maxrss) * 1024
    out["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps(out), flush=True)
"""
_GUARD_S = 60


class _Worker:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(REF)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self._line(300) == "ready"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"the load did not finish within {timeout} s (hang guard)")
        return self.proc.stdout.readline().strip()

    def load(self, loader: str, path: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([loader, str(path)]) + "\n")
        self.proc.stdin.flush()
        line = self._line(_GUARD_S)
        if not line:
            pytest.fail(f"the worker died loading {path} (exit {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result


@pytest.fixture(scope="module")
def worker() -> Iterator[Callable[[str, Path], dict[str, Any]]]:
    holder: list[_Worker] = []

    def load(loader: str, path: Path) -> dict[str, Any]:
        if not holder or holder[0].proc.poll() is not None:
            if holder:
                holder[0].close()
            holder[:] = [_Worker()]
        return holder[0].load(loader, path)

    yield load
    if holder:
        holder[0].close()


def _refused(result: dict[str, Any], path: Path, match: str, size: int) -> None:
    """One user error naming the file and the cause, within a small multiple of the file size
    in Python objects (tracemalloc) and in resident memory (the peak's growth)."""
    assert result["error"] in ("UnsafePickleError", "UnsupportedNetworkError"), result
    assert result["user_error"] and str(path) in result["message"], result
    assert match in result["message"], result
    assert result["py_peak"] <= 16 * MiB + 8 * size, result
    assert result["rss_growth"] <= 64 * MiB + 8 * size, result


# -- issue 22 §1: every case refused in one error, bounded ------------------------------------


def _huge_opcode(code: bytes) -> bytes:
    return b"\x80\x04" + code + struct.pack("<Q", 2**62) + b"xyz"


def _kwargs(**changes: Any) -> bytes:
    root = _tiny()
    root.meta["state"]["_init_kwargs"].update(changes)
    return _dump(root)


def _module_src_bomb() -> bytes:
    root = _tiny()
    root.meta["module_src"] = _list_bomb()
    return _dump(root)


def _dag(levels: int = 40) -> bytes:
    root = _tiny()
    node = _Rec(_meta("Linear", {}))
    for _ in range(levels):
        node = _Rec(_meta("UNetBlock", {"_modules": {"a": node, "b": node}}))
    _unet(root).meta["state"]["_modules"]["dag"] = node
    return _dump(root)


def _cycle() -> bytes:
    root = _tiny()
    enc = _unet(root).meta["state"]["_modules"]["enc"]
    enc._modules["loop"] = enc  # a ModuleDict is memoized before its state: the cycle pickles
    return _dump(root)


def _build_after_check() -> bytes:
    root = _tiny()
    return _dump(_Rec(root.meta, build={"state": [1, 2, 3]}))


def _mutated_after_check() -> bytes:
    """A snapshot whose second entry reaches the network's state dict again and sets its
    ``_modules`` to a list, after the record was made from it."""
    root = _tiny()
    state = root.meta["state"]

    def emit(p: Any) -> None:
        p.write(p.get(p.memo[id(state)][0]))
        p.save("_modules")
        p.save([1, 2, 3])
        p.write(pickle.SETITEM)

    return _dump({"ema": root, "zz": _Raw(emit)})


def _deep_kwarg(depth: int) -> bytes:
    return _kwargs(channel_mult=_deep_list(depth))


def _replayed_storage() -> bytes:
    blob = _storage_blob(1 << 18, bytes(1 << 20))  # 1 MiB, referenced 64 times
    return _dump([_Reduce(torch.storage._load_from_bytes, blob) for _ in range(64)])


def _expanded_view() -> bytes:
    return _dump(_view(_storage(1, bytes(4)), 0, (1 << 40,), (0,)))


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # (builder, what the message must say)
    "binbytes8_2^62": (lambda: _huge_opcode(b"\x8e"), "BINBYTES8 declares 4611686018427387904"),
    "binunicode8_1TiB": (
        lambda: b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"abc",
        "BINUNICODE8 declares 1099511627776",
    ),
    "frame_2^62": (lambda: _huge_opcode(b"\x95"), "FRAME declares"),
    "storage_2^31_floats": (lambda: _dump(_storage(2**31, bytes(16))), "declares 2147483648"),
    "storage_10^12_floats": (lambda: _dump(_storage(10**12, bytes(16))), "declares 10000000"),
    "storage_replayed": (_replayed_storage, "more than the file's"),
    "view_negative_offset": (
        lambda: _dump(_view(_storage(4, bytes(16)), -1, (4,), (1,))),
        "storage offset outside",
    ),
    "view_beyond_storage": (
        lambda: _dump(_view(_storage(4, bytes(16)), 2, (4,), (1,))),
        "reaches element 5 of a storage of 4",
    ),
    "view_expanded_2^40": (_expanded_view, "more than twice the file's"),
    "kwarg_list_bomb": (lambda: _kwargs(channel_mult=_list_bomb()), "channel_mult is not"),
    "module_src_list_bomb": (_module_src_bomb, "module_src is a list"),
    "kwarg_num_blocks_10^9": (lambda: _kwargs(num_blocks=10**9), "num_blocks is not"),
    "module_dag_2^40_paths": (_dag, "a module met before"),
    "module_cycle": (_cycle, "a module met before"),
    "list_200000_deep": (lambda: _deep_kwarg(200_000), "pickle operations"),
    "list_5000_deep": (lambda: _deep_kwarg(5000), "channel_mult is not"),
    "tuple_bomb_key": (lambda: _dump(_tuple_bomb_key()), "a tuple or frozenset of"),
    "build_sets_record_state": (_build_after_check, "BUILD"),
    "state_changed_after_check": (_mutated_after_check, "_modules is a list"),
    "empty_file": (lambda: b"", "the file is empty"),
    "not_a_pickle": (lambda: b"GIF89a" + bytes(64), "not a pickle"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickle_is_refused_in_bounds(
    tmp_path: Path, worker: Callable[[str, Path], dict[str, Any]], case: str
) -> None:
    build, match = HOSTILE[case]
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(build())
    _refused(worker("nvlabs", path), path, match, path.stat().st_size)


def _legacy_checkpoint(declared: int) -> bytes:
    """A legacy (non-zip) ``torch.save`` of ``{"w": tensor}`` whose storage declares
    ``declared`` float32 elements and holds 16 bytes."""
    f = io.BytesIO()
    info = {"protocol_version": 1001, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    for obj in (0x1950A86A20F9469CFC6C, 1001, info):
        pickle.dump(obj, f, protocol=2)
    key = object()

    class _IdPickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return (
                ("storage", torch.FloatStorage, "0", "cpu", declared, None) if obj is key else None
            )

    _IdPickler(f, protocol=2).dump({"w": _view(key, 0, (declared,), (1,))})  # type: ignore[arg-type]
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", declared) + bytes(16))
    return f.getvalue()


CHECKPOINTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "the file is empty"),
    "storage_2^31_floats": (lambda: _legacy_checkpoint(2**31), "truncated or damaged"),
    "storage_10^12_floats": (lambda: _legacy_checkpoint(10**12), "truncated or damaged"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_hostile_checkpoint_is_refused_in_bounds(
    tmp_path: Path, worker: Callable[[str, Path], dict[str, Any]], case: str
) -> None:
    """A ``.pt`` read with ``torch.load(weights_only=True)``: torch allocates a legacy storage's
    declared size lazily (or its allocator refuses), then finds the bytes missing: one error
    naming the file, and no memory touched."""
    build, match = CHECKPOINTS[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(build())
    result = worker("state_dict", path)
    assert result["error"] == "ValueError" and str(path) in result["message"], result
    assert match in result["message"] and "expected a PyTorch state dict" in result["message"]
    size = path.stat().st_size
    assert result["py_peak"] <= 16 * MiB + 8 * size, result
    assert result["rss_growth"] <= 64 * MiB + 8 * size, result


def test_editing_round_trip_is_faithful(tmp_path: Path) -> None:
    """Read and written again without an edit, the real NVlabs pickle loads and gives NVlabs'
    output (so the refusals above come from the edits)."""
    path = tmp_path / "copy.pkl"
    path.write_bytes(_dump(_tiny()))
    net, _ = load_network_pickle(path)
    case = CASES[REF.name]
    with torch.no_grad():
        _close32(net(case["x"], case["sigma"], torch.eye(4)[case["labels"]]), case)


# -- issue 22 §2: a regression in the allow-list or the blob reader is caught ----------------


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


@pytest.mark.parametrize(
    "gadget",
    [torch.save, torch.serialization.save, torch.load, torch.serialization.load],
    ids=["torch.save", "torch.serialization.save", "torch.load", "torch.serialization.load"],
)
def test_torch_globals_outside_the_allow_list_are_refused(
    tmp_path: Path, gadget: Callable[..., Any]
) -> None:
    """torch has globals that write, load or run code: resolving ``torch.*`` beyond the
    allow-list would let these run (the save gadgets create the marker file; torch.load reads a
    file the pickle names)."""
    marker = tmp_path / "marker"
    args: tuple[Any, ...] = (0, str(marker))
    if gadget in (torch.load, torch.serialization.load):
        torch.save(0, marker.with_suffix(".pt"))
        args = (str(marker.with_suffix(".pt")),)
    path = tmp_path / "gadget.pkl"
    path.write_bytes(_dump({"ema": _Reduce(gadget, *args)}))
    if gadget in (torch.save, torch.serialization.save):
        pickle.loads(path.read_bytes())  # ordinary unpickling runs the gadget
        assert marker.exists()
        marker.unlink()
    name = f"{gadget.__module__}.{gadget.__name__}"
    with pytest.raises(UnsafePickleError, match=f"global {name}") as err:
        load_network_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_payload_inside_a_storage_blob_is_refused(tmp_path: Path) -> None:
    """The bytes given to ``torch.storage._load_from_bytes`` are themselves a pickle: one that
    runs code is refused, never run (reading them with ``torch.load(weights_only=False)`` would
    run it)."""
    marker = tmp_path / "marker"
    blob = pickle.dumps(_Reduce(builtins.exec, _marker_code(marker)))
    path = tmp_path / "trojan_blob.pkl"
    path.write_bytes(_dump({"ema": _Reduce(torch.storage._load_from_bytes, blob)}))
    with pytest.raises(RuntimeError, match="magic number"):
        pickle.loads(path.read_bytes())  # reads the blob with weights_only=False: runs it first
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match="storage blob references the global builtins"):
        load_network_pickle(path)
    assert not marker.exists()


def test_positional_constructor_arguments_map_in_nvlabs_order(tmp_path: Path) -> None:
    """``persistence`` records positional arguments as given: (img_resolution, img_channels,
    label_dim, use_fp16) = (8, 3, 4, True); any other order builds a network the weights do not
    fit, or one of the wrong size."""
    root = _tiny()
    kwargs = root.meta["state"]["_init_kwargs"]
    names = ("img_resolution", "img_channels", "label_dim", "use_fp16")
    root.meta["state"]["_init_args"] = tuple(kwargs.pop(k) for k in names)
    assert root.meta["state"]["_init_args"] == (8, 3, 4, True)
    path = tmp_path / "positional.pkl"
    path.write_bytes(_dump(root))
    net, info = load_network_pickle(path)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (8, 3, 4, True)
    case = CASES[REF.name]
    assert info["init_kwargs"] == case["init_kwargs"]
    with torch.no_grad():
        _close32(net(case["x"], case["sigma"], torch.eye(4)[case["labels"]]), case)

"""A restricted pickle reader that bounds what a file can make it build, before building it.

fguide reads NVlabs' network pickles (:mod:`fguide.models.nvlabs`) with this reader, never with
:mod:`pickle`. It is a small pickle machine of its own:

* it resolves only the globals its caller allows and calls nothing else (no embedded code runs);
  ``REDUCE`` calls only a global it resolved, ``NEWOBJ`` and ``BUILD`` go to the caller, which
  allows them for its own stand-in classes only;
* it accepts the binary opcodes of protocols 2–5 (and ``GLOBAL``, which protocol 2 uses) and
  refuses the rest: text opcodes, persistent ids (unless the caller reads them), extension
  codes, out-of-band buffers, ``INST``/``OBJ``;
* every declared length (bytes, strings, frames, integers) is checked against the bytes left in
  the file before it is read, so the strings and bytes it builds never exceed the file's size;
* it runs at most :data:`MIN_OPS` + size / :data:`BYTES_PER_OP` operations, each of which builds
  at most one small object: the objects of a pickle are bounded by its size;
* tuples and frozensets (the containers Python hashes) hold at most :data:`MAX_TUPLE_ELEMENTS`
  elements counted through shared references and nest at most :data:`MAX_TUPLE_DEPTH` deep, and
  dictionary keys and set items are scalars or such tuples, so hashing a key is cheap.

Tensor storages and views inside such a pickle are read by :mod:`fguide.models.pickled_tensors`
within the same :class:`Budget`.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from fguide.models.loading import UnsafeCheckpointError

__all__ = [
    "BYTES_PER_OP",
    "MAX_TUPLE_DEPTH",
    "MAX_TUPLE_ELEMENTS",
    "MIN_OPS",
    "Budget",
    "BoundedUnpickler",
    "UnsafePickleError",
    "kind",
]

MIN_OPS = 200_000
BYTES_PER_OP = 16
"""A pickle of ``size`` bytes may run ``MIN_OPS + size // BYTES_PER_OP`` operations."""
MAX_TUPLE_ELEMENTS = 1000
MAX_TUPLE_DEPTH = 32
_MAX_NAME = 256  # characters of a GLOBAL's module or name


class UnsafePickleError(UnsafeCheckpointError):
    """A pickle that needs something outside the allow-list or breaks a bound; says which."""


@dataclass
class Budget:
    """Bytes a pickle of ``size`` bytes may materialise as tensor storages and tensor views."""

    size: int
    storage_bytes: int = 0
    view_bytes: int = 0

    def charge_storage(self, nbytes: int) -> None:
        self.storage_bytes += nbytes
        if self.storage_bytes > self.size:
            raise UnsafePickleError(
                f"its tensor storages hold {self.storage_bytes} bytes, more than the file's "
                f"{self.size} (the same storage bytes are unpickled more than once)"
            )

    def charge_view(self, nbytes: int) -> None:
        self.view_bytes += nbytes
        if self.view_bytes > 2 * self.size:
            raise UnsafePickleError(
                f"its tensors span {self.view_bytes} bytes, more than twice the file's "
                f"{self.size} (tensors repeat or expand the same storage)"
            )


_STOP = object()
_SCALARS = (str, bytes, int, float, bool, type(None))
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


class _Source:
    """The file, read forwards, with the bytes left known before every read."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.left = file, size

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise UnsafePickleError(
                f"{what} declares {n} bytes but only {self.left} are left in the file"
            )
        data = self.file.read(n)
        if len(data) != n:
            raise UnsafePickleError(f"the file ends inside {what} (truncated)")
        self.left -= n
        return data

    def readline(self, what: str) -> bytes:
        line = self.file.readline(min(self.left, _MAX_NAME + 1))
        self.left -= len(line)
        if not line.endswith(b"\n"):
            raise UnsafePickleError(f"{what}: a name longer than {_MAX_NAME} characters or cut")
        return line[:-1]


class BoundedUnpickler:
    """One pickle from ``file`` (``size`` bytes left in it), built within the module's bounds.

    Subclasses allow what their files need: :meth:`find_class` (globals), :meth:`new_object`
    (``NEWOBJ``), :meth:`set_state` (``BUILD``) and :meth:`persistent_load`; each refuses by
    default. Every refusal and every broken bound raises :class:`UnsafePickleError`.
    """

    def __init__(self, file: BinaryIO, size: int, budget: Budget | None = None):
        self.src = _Source(file, size)
        self.budget = budget or Budget(size)
        self.max_ops = MIN_OPS + size // BYTES_PER_OP
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.callables: dict[int, Any] = {}
        self.tuples: dict[int, tuple[int, int, Any]] = {}  # id -> (elements, depth, object)
        self.result: Any = None

    # -- what a subclass allows -----------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"it references the global {module}.{name}")

    def new_object(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise UnsafePickleError(f"it creates an object of {kind(cls)} with NEWOBJ")

    def set_state(self, obj: Any, state: Any) -> None:
        raise UnsafePickleError(f"it sets the state of a {kind(obj)} with BUILD")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"it uses a persistent id (a {kind(pid)})")

    # -- the machine ----------------------------------------------------------------------------

    def load(self) -> Any:
        """Run the pickle to its ``STOP`` and return the object it built."""
        ops = 0
        while True:
            code = self.src.read(1, "the next opcode") if self.src.left else b""
            if not code:
                raise UnsafePickleError("the file ends before the pickle's STOP (truncated)")
            ops += 1
            if ops > self.max_ops:
                raise UnsafePickleError(
                    f"it runs more than {self.max_ops} pickle operations, more than a file of "
                    "its size can describe"
                )
            handler = _DISPATCH.get(code[0])
            if handler is None:
                name = _NAMES.get(code[0], f"byte 0x{code[0]:02x}")
                raise UnsafePickleError(f"opcode {name} is not accepted")
            if handler(self) is _STOP:
                if self.stack or self.metastack:
                    raise UnsafePickleError("it stops with objects left on its stack")
                return self.result

    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise UnsafePickleError("an opcode needs a MARK that is not there")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _top(self, what: str) -> Any:
        if not self.stack:
            raise UnsafePickleError(f"{what} on an empty stack")
        return self.stack[-1]

    def _pop(self) -> Any:
        if not self.stack:
            raise UnsafePickleError("an opcode pops an empty stack")
        return self.stack.pop()

    def _size(self, fmt: str, what: str) -> int:
        return int(struct.unpack(fmt, self.src.read(struct.calcsize(fmt), what))[0])

    def _register_tuple(self, t: tuple[Any, ...] | frozenset[Any]) -> Any:
        elements, depth = len(t), 1
        for item in t:
            if isinstance(item, tuple | frozenset) and item:
                e, d, _ = self.tuples[id(item)]
                elements, depth = elements + e, max(depth, d + 1)
        if elements > MAX_TUPLE_ELEMENTS or depth > MAX_TUPLE_DEPTH:
            raise UnsafePickleError(
                f"a tuple or frozenset of {elements} elements (counted through shared "
                f"references) or {depth} levels; at most {MAX_TUPLE_ELEMENTS} and "
                f"{MAX_TUPLE_DEPTH}"
            )
        if t:
            self.tuples[id(t)] = (elements, depth, t)
        return t

    def _key(self, key: Any) -> Any:
        if type(key) in _SCALARS:
            return key
        if type(key) in (tuple, frozenset) and (not key or id(key) in self.tuples):
            return key
        raise UnsafePickleError(f"a dictionary key or set item is a {kind(key)}")

    def _tuple(self, n: int) -> None:
        items = tuple(self.stack[-n:]) if n else ()
        if len(self.stack) < n:
            raise UnsafePickleError("an opcode pops an empty stack")
        del self.stack[len(self.stack) - n :]
        self.stack.append(self._register_tuple(items))

    def _reduce(self) -> None:
        args = self._pop()
        if not self.stack:
            raise UnsafePickleError("REDUCE without a callable")
        func = self.stack[-1]
        if id(func) not in self.callables or not isinstance(args, tuple):
            raise UnsafePickleError(f"REDUCE calls a {kind(func)} it did not resolve as a global")
        self.stack[-1] = func(*args)

    def _global(self, module: Any, name: Any) -> None:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnsafePickleError("STACK_GLOBAL with names that are not strings")
        if len(module) > _MAX_NAME or len(name) > _MAX_NAME:
            raise UnsafePickleError(f"a global name longer than {_MAX_NAME} characters")
        obj = self.find_class(module, name)
        if callable(obj):
            self.callables[id(obj)] = obj
        self.stack.append(obj)

    def _text(self, fmt: str, what: str) -> str:
        data = self.src.read(self._size(fmt, what), what)
        return data.decode("utf-8", "surrogatepass")


def kind(obj: Any) -> str:
    """A bounded description of an untrusted object (its type, never its value)."""
    return type(obj).__name__ if not isinstance(obj, type) else f"class {obj.__name__}"


def _op(code: str) -> Callable[[Callable[[BoundedUnpickler], Any]], Any]:
    def register(fn: Callable[[BoundedUnpickler], Any]) -> Any:
        _DISPATCH[code.encode("latin-1")[0]] = fn
        return fn

    return register


_DISPATCH: dict[int, Callable[[BoundedUnpickler], Any]] = {}


@_op("\x80")
def _proto(u: BoundedUnpickler) -> None:
    proto = u.src.read(1, "PROTO")[0]
    if not 2 <= proto <= 5:
        raise UnsafePickleError(f"pickle protocol {proto} (fguide reads protocols 2 to 5)")


@_op("\x95")
def _frame(u: BoundedUnpickler) -> None:
    n = u._size("<Q", "FRAME")
    if n > u.src.left:  # frames only group the opcodes that follow: check, then read on
        raise UnsafePickleError(f"FRAME declares {n} bytes but only {u.src.left} are left")


@_op(".")
def _stop(u: BoundedUnpickler) -> object:
    u.result = u._pop()
    return _STOP


@_op("(")
def _mark(u: BoundedUnpickler) -> None:
    u.metastack.append(u.stack)
    u.stack = []


@_op("0")
def _pop_op(u: BoundedUnpickler) -> None:
    if u.stack:
        u.stack.pop()
    else:
        u._pop_mark()


_op("1")(lambda u: u._pop_mark())
_op("2")(lambda u: u.stack.append(u._top("DUP")))
_op("J")(lambda u: u.stack.append(u._size("<i", "BININT")))
_op("K")(lambda u: u.stack.append(u.src.read(1, "BININT1")[0]))
_op("M")(lambda u: u.stack.append(u._size("<H", "BININT2")))
_op("\x8a")(
    lambda u: u.stack.append(
        int.from_bytes(u.src.read(u.src.read(1, "LONG1")[0], "LONG1"), "little", signed=True)
    )
)
_op("\x8b")(
    lambda u: u.stack.append(
        int.from_bytes(u.src.read(u._size("<i", "LONG4"), "LONG4"), "little", signed=True)
    )
)
_op("G")(lambda u: u.stack.append(_binfloat(u)))
_op("N")(lambda u: u.stack.append(None))
_op("\x88")(lambda u: u.stack.append(True))
_op("\x89")(lambda u: u.stack.append(False))
_op("X")(lambda u: u.stack.append(u._text("<I", "BINUNICODE")))
_op("\x8c")(lambda u: u.stack.append(u._text("<B", "SHORT_BINUNICODE")))
_op("\x8d")(lambda u: u.stack.append(u._text("<Q", "BINUNICODE8")))
_op("B")(lambda u: u.stack.append(u.src.read(u._size("<I", "BINBYTES"), "BINBYTES")))
_op("C")(lambda u: u.stack.append(u.src.read(u._size("<B", "SHORT_BINBYTES"), "SHORT_BINBYTES")))
_op("\x8e")(lambda u: u.stack.append(u.src.read(u._size("<Q", "BINBYTES8"), "BINBYTES8")))
_op("\x96")(
    lambda u: u.stack.append(bytearray(u.src.read(u._size("<Q", "BYTEARRAY8"), "BYTEARRAY8")))
)
_op("]")(lambda u: u.stack.append([]))
_op(")")(lambda u: u.stack.append(()))
_op("}")(lambda u: u.stack.append({}))
_op("\x8f")(lambda u: u.stack.append(set()))


@_op("l")
def _list(u: BoundedUnpickler) -> None:
    items = u._pop_mark()  # first: it replaces u.stack
    u.stack.append(items)


@_op("t")
def _tuple_mark(u: BoundedUnpickler) -> None:
    items = tuple(u._pop_mark())
    u.stack.append(u._register_tuple(items))


_op("\x85")(lambda u: u._tuple(1))
_op("\x86")(lambda u: u._tuple(2))
_op("\x87")(lambda u: u._tuple(3))
_op("R")(lambda u: u._reduce())


def _binfloat(u: BoundedUnpickler) -> float:
    return float(struct.unpack(">d", u.src.read(8, "BINFLOAT"))[0])


def _target(u: BoundedUnpickler, kind: type, what: str) -> Any:
    if not u.stack or not isinstance(u.stack[-1], kind):
        raise UnsafePickleError(f"{what} on something that is not a {kind.__name__}")
    return u.stack[-1]


@_op("a")
def _append(u: BoundedUnpickler) -> None:
    item = u._pop()
    _target(u, list, "APPEND").append(item)


@_op("e")
def _appends(u: BoundedUnpickler) -> None:
    items = u._pop_mark()
    _target(u, list, "APPENDS").extend(items)


def _set_items(u: BoundedUnpickler, items: list[Any], what: str) -> None:
    if len(items) % 2:
        raise UnsafePickleError(f"{what} with an odd number of items")
    target = _target(u, dict, what)
    for i in range(0, len(items), 2):
        target[u._key(items[i])] = items[i + 1]


@_op("s")
def _setitem(u: BoundedUnpickler) -> None:
    value, key = u._pop(), u._pop()
    _set_items(u, [key, value], "SETITEM")


_op("u")(lambda u: _set_items(u, u._pop_mark(), "SETITEMS"))


@_op("d")
def _dict(u: BoundedUnpickler) -> None:
    items = u._pop_mark()
    u.stack.append({})
    _set_items(u, items, "DICT")


@_op("\x90")
def _additems(u: BoundedUnpickler) -> None:
    items = u._pop_mark()
    _target(u, set, "ADDITEMS").update(u._key(k) for k in items)


@_op("\x91")
def _frozenset(u: BoundedUnpickler) -> None:
    items = [u._key(k) for k in u._pop_mark()]
    u.stack.append(u._register_tuple(frozenset(items)))


def _get(u: BoundedUnpickler, idx: int) -> None:
    if idx not in u.memo:
        raise UnsafePickleError(f"it refers to memo entry {idx}, which it never stored")
    u.stack.append(u.memo[idx])


def _put(u: BoundedUnpickler, idx: int) -> None:
    if not u.stack:
        raise UnsafePickleError("it memoizes an empty stack")
    u.memo[idx] = u.stack[-1]


_op("h")(lambda u: _get(u, u.src.read(1, "BINGET")[0]))
_op("j")(lambda u: _get(u, u._size("<I", "LONG_BINGET")))
_op("q")(lambda u: _put(u, u.src.read(1, "BINPUT")[0]))
_op("r")(lambda u: _put(u, u._size("<I", "LONG_BINPUT")))
_op("\x94")(lambda u: _put(u, len(u.memo)))


@_op("c")
def _global_op(u: BoundedUnpickler) -> None:
    module = u.src.readline("GLOBAL").decode("utf-8", "replace")
    name = u.src.readline("GLOBAL").decode("utf-8", "replace")
    u._global(module, name)


@_op("\x93")
def _stack_global(u: BoundedUnpickler) -> None:
    name, module = u._pop(), u._pop()
    u._global(module, name)


@_op("\x81")
def _newobj(u: BoundedUnpickler) -> None:
    args, cls = u._pop(), u._pop()
    if not isinstance(args, tuple):
        raise UnsafePickleError("NEWOBJ with arguments that are not a tuple")
    u.stack.append(u.new_object(cls, args, {}))


@_op("\x92")
def _newobj_ex(u: BoundedUnpickler) -> None:
    kwargs, args, cls = u._pop(), u._pop(), u._pop()
    if not (isinstance(args, tuple) and isinstance(kwargs, dict)):
        raise UnsafePickleError("NEWOBJ_EX with malformed arguments")
    u.stack.append(u.new_object(cls, args, kwargs))


@_op("b")
def _build(u: BoundedUnpickler) -> None:
    state = u._pop()
    if not u.stack:
        raise UnsafePickleError("BUILD without an object")
    u.set_state(u.stack[-1], state)


@_op("Q")
def _binpersid(u: BoundedUnpickler) -> None:
    u.stack.append(u.persistent_load(u._pop()))

"""Restricted reader for PanoHead / EG3D `network-snapshot-*.pkl` files (DESIGN §7).

Those pickles are written through `torch_utils.persistence`: every network object is
stored as `_reconstruct_persistent_obj(meta)` where `meta` carries the *source text* of
its defining module, which the official loader executes. We never execute it. This
module unpickles with an allow-list: tensors, a few containers and numpy scalars are
rebuilt; persistent objects become inert `PersistentRecord`s (class name + state);
every other global reference is refused before anything is called.

Tensor storages inside these pickles are `torch.storage._load_from_bytes(blob)` calls
whose blob is a small *legacy* (non-zip) `torch.save` stream; we parse that stream
ourselves with the same allow-list instead of calling torch.load on it.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WeightsError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch's legacy typed storages -> dtype. Only numeric types are accepted.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# ------------------------------------------------------------------------ stand-ins
class PersistentRecord:
    """What `_reconstruct_persistent_obj(meta)` becomes: the class name and the pickled
    `__dict__` of the object. `module_src` is kept only as a hash, never executed."""

    def __init__(self, class_name: str, state: dict, module_src_sha256: str, version: Any):
        self.class_name = class_name
        self.state = state
        self.module_src_sha256 = module_src_sha256
        self.version = version

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args", ()))

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs", {}))

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class PlainObjectRecord:
    """Stand-in for allow-listed classes pickled *by reference* (torch.nn.Sequential,
    Softplus, PanoHead's RaySampler): created by NEWOBJ, filled by BUILD, nothing runs."""

    qualname = "?"

    def __init__(self, *args, **kwargs):  # NEWOBJ may pass args; they are recorded only
        self.args = args
        self.state: dict = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict_state, slots_state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise WeightsError(f"refusing to load: unexpected state for {self.qualname}",
                               hint="the snapshot is not a PanoHead/EG3D network pickle")
        self.state = state

    @property
    def class_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"PlainObjectRecord({self.qualname})"


def _plain_record_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1] + "Record", (PlainObjectRecord,), {"qualname": qualname})


_BY_REFERENCE = {
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "Softplus"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "LeakyReLU"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
}
_RECORD_CLASSES = {k: _plain_record_class(".".join(k)) for k in _BY_REFERENCE}


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise WeightsError("refusing to load: a persistent object record is malformed",
                           hint="the snapshot is not a torch_utils.persistence pickle")
    src = meta.get("module_src", "")
    sha = hashlib.sha256(src.encode("utf-8", "replace") if isinstance(src, str) else b"").hexdigest()
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise WeightsError(f"refusing to load: state of {meta['class_name']} is not a dict",
                           hint="the snapshot is not a torch_utils.persistence pickle")
    return PersistentRecord(meta["class_name"], state, sha, meta.get("version"))


def _np_scalar(dtype, data=None):
    """numpy.core.multiarray.scalar without the object-dtype path (which returns an
    arbitrary unpickled object)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise WeightsError("refusing to load: a numpy scalar of object dtype",
                           hint="the snapshot is not a plain network pickle")
    if len(data) != dtype.itemsize:
        raise WeightsError("refusing to load: a numpy scalar has the wrong byte size")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise WeightsError(f"refusing to load: numpy.dtype({type(spec).__name__})")
    return np.dtype(spec, align, copy)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise WeightsError("refusing to load: a tensor references something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise WeightsError("refusing to load: a tensor has a malformed shape/stride")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= storage.numel():
        raise WeightsError("refusing to load: a tensor reaches past its storage",
                           hint="the snapshot is truncated or corrupt")
    return storage.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra):
    if not isinstance(data, torch.Tensor):
        raise WeightsError("refusing to load: a parameter wraps something that is not a tensor")
    return data


def _load_from_bytes(blob):
    if not isinstance(blob, (bytes, bytearray)):
        raise WeightsError("refusing to load: a storage blob is not bytes")
    return read_legacy_storage(bytes(blob))


_OUTER_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "dtype"): _np_dtype,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    **{k: v for k, v in _RECORD_CLASSES.items()},
}


def _refuse(what: str, where: str):
    raise WeightsError(f"refusing to load {where}: it references {what}",
                       hint="only PanoHead/EG3D network snapshots are accepted; this pickle would run code")


class _StorageRef:
    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _LegacyUnpickler(pickle.Unpickler):
    """The sub-pickles of a legacy torch.save stream: only storage type names are global."""

    def __init__(self, f, where):
        super().__init__(f)
        self.where = where
        self.refs: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
            return ("__storage_type__", _STORAGE_DTYPES[name])
        _refuse(f"{module}.{name}", self.where)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"refusing to load {self.where}: unknown persistent id")
        typ, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not (isinstance(typ, tuple) and typ[0] == "__storage_type__") or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"refusing to load {self.where}: malformed storage record")
        if len(pid) > 5 and pid[5] is not None:
            raise WeightsError(f"refusing to load {self.where}: storage views are not supported")
        ref = self.refs.setdefault(str(key), _StorageRef(typ[1], str(key), numel))
        return ref


def read_legacy_storage(blob: bytes, where: str = "a storage blob") -> torch.Tensor:
    """Parse one legacy (pre-zip) `torch.save(storage)` stream into a flat tensor."""
    f = io.BytesIO(blob)
    try:
        magic = _LegacyUnpickler(f, where).load()
        proto = _LegacyUnpickler(f, where).load()
        sys_info = _LegacyUnpickler(f, where).load()
        if magic != _LEGACY_MAGIC or proto != _LEGACY_PROTOCOL:
            raise WeightsError(f"refusing to load {where}: not a legacy torch.save stream")
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise WeightsError(f"refusing to load {where}: big-endian or malformed storage stream")
        up = _LegacyUnpickler(f, where)
        root = up.load()
        keys = _LegacyUnpickler(f, where).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
        raise WeightsError(f"cannot read {where}: {e.__class__.__name__}: {e}",
                           hint="the snapshot is truncated or corrupt") from None
    if not isinstance(root, _StorageRef) or not isinstance(keys, list):
        raise WeightsError(f"refusing to load {where}: the stream does not hold one storage")
    out = None
    for key in keys:
        ref = up.refs.get(str(key))
        if ref is None:
            raise WeightsError(f"refusing to load {where}: unknown storage key")
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"cannot read {where}: truncated", hint="the snapshot is truncated or corrupt")
        numel = struct.unpack("<q", head)[0]
        nbytes = numel * torch.empty((), dtype=ref.dtype).element_size()
        raw = f.read(nbytes)
        if numel != ref.numel or len(raw) != nbytes:
            raise WeightsError(f"cannot read {where}: storage size mismatch", hint="the snapshot is truncated or corrupt")
        t = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        if ref is root:
            out = t
    if out is None:
        raise WeightsError(f"refusing to load {where}: the storage data is missing")
    return out


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module, name):
        obj = _OUTER_ALLOWED.get((module, name))
        if obj is None:
            _refuse(f"{module}.{name}", self.where)
        return obj

    def persistent_load(self, pid):
        raise WeightsError(f"refusing to load {self.where}: unexpected persistent id",
                           hint="zip-format checkpoints are read with torch.load(weights_only=True)")


def restricted_load(path_or_bytes, where: str | None = None) -> Any:
    """Unpickle with the allow-list above. Raises WeightsError (exit 4) on anything else."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return _restricted_load_stream(io.BytesIO(bytes(path_or_bytes)), where or "the pickle")
    p = Path(path_or_bytes)
    if not p.is_file():
        raise WeightsError(f"no PanoHead snapshot at {p}", hint="download the .pkl first (portrait3d weights download panohead)")
    with open(p, "rb") as f:  # streamed: the released pickle is 563 MB
        return _restricted_load_stream(f, where or str(p))


def _restricted_load_stream(f, where: str) -> Any:
    head = f.read(2)
    f.seek(0)
    if head == b"PK":
        raise WeightsError(f"{where} is a zip-format torch checkpoint, not a network-snapshot pickle",
                           hint="load .pt state dicts with load_state_dict_file()")
    try:
        return RestrictedUnpickler(f, where).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RuntimeError, MemoryError) as e:
        raise WeightsError(f"cannot read {where}: {e.__class__.__name__}: {e}",
                           hint="the snapshot is truncated or corrupt") from None


# ------------------------------------------------------------------ module trees
@dataclass
class Snapshot:
    """What we take from a network-snapshot pickle: one network's flat state dict,
    its constructor kwargs, and the runtime attributes the renders depend on."""

    class_name: str
    init_args: tuple
    init_kwargs: dict
    state_dict: "OrderedDict[str, torch.Tensor]"
    runtime: dict = field(default_factory=dict)   # neural_rendering_resolution, rendering_kwargs
    record: Any = None


def _module_state(rec) -> dict:
    return rec.state if isinstance(rec, (PersistentRecord, PlainObjectRecord)) else {}


def flatten_state_dict(rec, prefix: str = "", out=None) -> "OrderedDict[str, torch.Tensor]":
    """nn.Module.state_dict() order over a record tree: params, persistent buffers, children."""
    out = OrderedDict() if out is None else out
    st = _module_state(rec)
    nonpersistent = set(st.get("_non_persistent_buffers_set", ()) or ())
    for name, t in (st.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = _as_tensor(t, prefix + name)
    for name, t in (st.get("_buffers") or {}).items():
        if t is not None and name not in nonpersistent:
            out[prefix + name] = _as_tensor(t, prefix + name)
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            flatten_state_dict(child, prefix + name + ".", out)
    return out


def _as_tensor(t, key):
    if not isinstance(t, torch.Tensor):
        raise WeightsError(f"snapshot entry {key} is not a tensor", hint="the snapshot is corrupt")
    return t


def _plain(x):
    """EasyDicts came back as dicts; numpy scalars -> python numbers."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def load_network_snapshot(path, key: str = "G_ema") -> Snapshot:
    """Read `key` (default G_ema, the averaged generator used for inference; never `G`)
    out of a PanoHead/EG3D network-snapshot pickle without executing anything."""
    top = restricted_load(path)
    if not isinstance(top, dict) or key not in top:
        keys = sorted(top) if isinstance(top, dict) else type(top).__name__
        raise WeightsError(f"{path} has no {key!r} network (found {keys})",
                           hint="expected a PanoHead network-snapshot pickle with G, D and G_ema")
    rec = top[key]
    if not isinstance(rec, PersistentRecord):
        raise WeightsError(f"{path}: {key} is not a persistent network object")
    sd = flatten_state_dict(rec)
    # Tensors may share storage with G (memo refs): copy into contiguous, owned memory.
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in sd.items())
    runtime = {}
    for attr in ("neural_rendering_resolution", "rendering_kwargs"):
        if attr in rec.state:
            runtime[attr] = _plain(rec.state[attr])
    return Snapshot(rec.class_name, tuple(_plain(rec.init_args)), _plain(rec.init_kwargs), sd, runtime, rec)


def load_state_dict_file(path) -> "OrderedDict[str, torch.Tensor]":
    """A `torch.save(state_dict)` file, read with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no state dict at {p}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or corrupt files
        raise WeightsError(f"refusing to load {p}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           hint="expected a plain tensor state dict saved with torch.save") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"{p} is not a flat tensor state dict")
    return OrderedDict(sd)

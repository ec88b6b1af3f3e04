"""PyTorch's zip checkpoint format (``torch.save``), read and written without torch.

A ``.bin`` is an uncompressed zip: ``<archive>/data.pkl`` pickles a dict of tensors whose
storages are persistent ids ``('storage', <dtype>Storage, key, location, numel)`` pointing
at ``<archive>/data/<key>``. Reading unpickles with a ``find_class`` that knows only the
tensor-rebuilding names and refuses everything else, so a hostile pickle cannot run
code; storages become memory-mapped records. Writing emits the same opcodes by hand.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export.tensor_record import RAW_DTYPES, TensorRecord

STORAGE_DTYPES = {"BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32"}
MAX_PICKLE_BYTES = 64 * 2**20  # a Qwen-VL shard's data.pkl is ~100 KB; refuse absurd ones before inflating
ALIGN = 64  # torch aligns each storage record to 64 bytes, which keeps mmaps aligned


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple) or len(values) > 8 or not all(_is_size(v) for v in values):
        raise ValueError(f"tensor {what} {values!r:.60} is not a tuple of non-negative integers")
    return values


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**40


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *rest):
    if not isinstance(storage, _Storage) or not _is_size(storage_offset):
        raise ValueError("tensor rebuilt from something that is not a storage")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    return _LazyTensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Knows torch's tensor-rebuilding names and nothing else."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise CheckpointError(f"{self.path}: refused: the pickle asks for {module}.{name}, "
                              "not a tensor (only tensor rebuilding is allowed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_size(pid[4])):
            raise CheckpointError(f"{self.path}: refused: unexpected persistent id (a {type(pid).__name__})")
        return _Storage(pid[1].dtype, pid[2], pid[4])


def _data_offset(fp, info: zipfile.ZipInfo) -> int:
    """Offset of an entry's bytes: past its local header, whose extra field may differ."""
    fp.seek(info.header_offset)
    local = fp.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_zip(path: Path) -> dict[str, TensorRecord]:
    """Lazy records of every tensor in one torch zip checkpoint."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fp:
            state, prefix = _load_state(zf, path)
            entries = {i.filename: i for i in zf.infolist()}
            return {str(name): _record(path, str(name), t, entries, prefix, fp, size) for name, t in state.items()}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError, struct.error,
            OverflowError) as e:
        raise CheckpointError(f"{path}: truncated or not a zip file ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _load_state(zf: zipfile.ZipFile, path: Path) -> tuple[dict, str]:
    """The unpickled state dict and the archive's folder prefix; the pickle's size is checked before reading."""
    pkl = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl)")
    info = pkl[0]
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: data.pkl declares {info.file_size} bytes, over the "
                              f"{MAX_PICKLE_BYTES} a state dict needs: refused before reading")
    try:
        with zf.open(info) as member:  # zipfile stops inflating at the declared size
            data = member.read(MAX_PICKLE_BYTES + 1)
        _check_memo(data, path)
        state = _TensorOnlyUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # any failure of hostile bytes (zlib, CRC, unpickling) is the file's fault
        raise CheckpointError(f"{path}: corrupt pickle ({_one_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, not a state dict")
    return state, info.filename[: -len("data.pkl")]


def _check_memo(data: bytes, path: Path) -> None:
    """Refuse memo slots past the pickle's own size before unpickling: CPython's unpickler keeps its memo
    in an array, so ``LONG_BINPUT 4000000000`` in a few bytes would make it allocate 32 GB."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= len(data)):
            raise CheckpointError(f"{path}: refused: the pickle stores at memo slot {str(arg)[:20]}, past its "
                                  f"{len(data)} bytes")


def _record(path: Path, name: str, t: object, entries: dict[str, zipfile.ZipInfo], prefix: str, fp,
            size: int) -> TensorRecord:
    if not isinstance(t, _LazyTensor):
        raise CheckpointError(f"{path}: entry {name!r:.80} is not a tensor")
    info = entries.get(f"{prefix}data/{t.storage.key}")
    if info is None:
        raise CheckpointError(f"{path}: truncated: storage {t.storage.key:.40} of {name} is missing")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: storage of {name} is compressed; torch never does that")
    itemsize = RAW_DTYPES[t.storage.dtype].itemsize
    if info.file_size != t.storage.numel * itemsize:
        raise CheckpointError(f"{path}: storage of {name} holds {info.file_size} bytes, "
                              f"expected {t.storage.numel * itemsize}")
    contiguous = _contiguous_strides(t.shape) == t.stride
    rec = TensorRecord(name, path, t.storage.dtype, t.shape, _data_offset(fp, info),
                       t.storage.numel, t.storage_offset, None if contiguous else t.stride)
    rec.check_bounds(size)
    return rec


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


# ---- writing -------------------------------------------------------------------------------

_STORAGE_NAME = {v: k for k, v in STORAGE_DTYPES.items()}


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return pickle.BININT1 + bytes([n])
    if -(2**31) <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _pickle_str(s: str) -> bytes:
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _pickle_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _pickle_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def state_dict_pickle(shapes: dict[str, tuple[int, ...]], dtype: str) -> bytes:
    """The ``data.pkl`` torch writes for a dict of contiguous tensors, storage key = index."""
    empty_od = _pickle_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    out = [pickle.PROTO + b"\x02", empty_od, pickle.MARK]
    for key, (name, shape) in enumerate(shapes.items()):
        numel = int(np.prod(shape, dtype=np.int64))
        pid = _pickle_tuple([_pickle_str("storage"), _pickle_global("torch", _STORAGE_NAME[dtype]),
                             _pickle_str(str(key)), _pickle_str("cpu"), _pickle_int(numel)])
        args = _pickle_tuple([pid + pickle.BINPERSID, _pickle_int(0),
                              _pickle_tuple([_pickle_int(d) for d in shape]),
                              _pickle_tuple([_pickle_int(s) for s in _contiguous_strides(shape)]),
                              pickle.NEWFALSE, empty_od])
        out += [_pickle_str(name), _pickle_global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def write_torch_zip(path: Path, shapes: dict[str, tuple[int, ...]],
                    make_bits: Callable[[str], np.ndarray], dtype: str = "BF16") -> None:
    """Write a torch zip checkpoint, one tensor in memory at a time, storages 64-byte aligned."""
    path = Path(path)
    prefix = path.name.split(".")[0]
    np_dtype = RAW_DTYPES[dtype]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{prefix}/data.pkl", state_dict_pickle(shapes, dtype))
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, (name, shape) in enumerate(shapes.items()):
            arr = make_bits(name)
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np_dtype:
                raise ValueError(f"{name}: got {arr.dtype} {arr.shape}, planned {np_dtype} {shape}")
            _write_aligned(zf, f"{prefix}/data/{key}", np.ascontiguousarray(arr))
        zf.writestr(f"{prefix}/version", "3\n")


def _write_aligned(zf: zipfile.ZipFile, entry: str, arr: np.ndarray) -> None:
    info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = arr.nbytes
    zip64 = arr.nbytes >= zipfile.ZIP64_LIMIT
    header_end = zf.fp.tell() + 30 + len(entry.encode()) + (20 if zip64 else 0)
    pad = (-(header_end + 4)) % ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as w:
        flat = arr.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, 1 << 26):
            w.write(flat[start:start + (1 << 26)].data)

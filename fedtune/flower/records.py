"""Conversions between adapter states and Flower records, and wire-size accounting.

On the wire an adapter (or a dense update) travels *packed*: one ``uint8`` array
under the key `PACKED` holding the safetensors serialization of all its tensors
(`pack`). Flower sends every array of a record as its own objects (the array and
its chunks, one HTTPS request each in a deployment), so the arrays of a 24-tensor
adapter would be about 48 objects a message; packed they are two. A client's own
adapter copy and error-feedback residual in ``context.state`` are packed too (the
context travels between SuperNode and ClientApp worker with every message).
`from_arrayrecord` reads either form; inside the server (the strategy's per-key
averaging) records stay one array per tensor (`to_arrayrecord`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedtune.delta import Delta
from fedtune.errors import PayloadError

PACKED = "fedtune.safetensors"  # the one key of a packed record


def to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """One array per tensor (what Flower's strategies average key by key)."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in state.items()})


def pack(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The wire form of ``state``: one ``uint8`` array holding its safetensors serialization."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


def _unpack(arr) -> Delta:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_npy(arr)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError(f"a packed record holds a 1-d uint8 array, got {data.dtype} {tuple(data.shape)}")
    try:
        # safetensors checks the header against the buffer (offsets cover it exactly) before it allocates
        tensors = load(data.tobytes())
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise PayloadError(f"packed tensors could not be decoded: {exc}") from None
    return {k: tensors[k] for k in sorted(tensors)}


def from_arrayrecord(record: ArrayRecord) -> Delta:
    """The tensors of an ArrayRecord, packed (`pack`) or one array per tensor; `PayloadError`
    for anything a peer could have malformed.

    Each array's ``.npy`` header is read and checked against its bytes *before*
    any allocation (``np.load`` would allocate whatever shape a header claims):
    numeric dtypes only, the data exactly as long as the header's shape needs,
    and the header agreeing with the array's own dtype and shape fields. A
    packed record's safetensors header is checked the same way by safetensors.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected arrays, got {type(record).__name__}")
    if PACKED in record:
        if len(record) != 1:
            raise PayloadError(f"a packed record holds only {PACKED!r}, got {len(record)} arrays")
        try:
            return _unpack(record[PACKED])
        except PayloadError as exc:
            raise PayloadError(f"array {PACKED!r} could not be decoded: {exc}") from None
        except Exception as exc:  # malformed bytes from a peer
            raise PayloadError(f"array {PACKED!r} could not be decoded: {type(exc).__name__}: {exc}") from None
    out: Delta = {}
    for k, arr in record.items():
        try:
            out[k] = torch.from_numpy(_read_npy(arr))
        except PayloadError as exc:
            raise PayloadError(f"array {k!r} could not be decoded: {exc}") from None
        except Exception as exc:  # malformed bytes from a peer (a dtype torch lacks, ...)
            raise PayloadError(f"array {k!r} could not be decoded: {type(exc).__name__}: {exc}") from None
    return out


def _read_npy(arr) -> np.ndarray:
    import io

    from numpy.lib import format as npy

    if arr.stype != "numpy.ndarray":
        raise PayloadError(f"serialization type {arr.stype!r}, expected 'numpy.ndarray'")
    data = bytes(arr.data)
    fp = io.BytesIO(data)
    try:
        major, _minor = npy.read_magic(fp)
        read_header = {1: npy.read_array_header_1_0, 2: npy.read_array_header_2_0}.get(major)
        if read_header is None:
            raise PayloadError(f".npy format version {major} is not read here")
        shape, fortran, dtype = read_header(fp)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:  # numpy's own header checks
        raise PayloadError(f"malformed .npy header: {exc}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufc" or dtype.itemsize == 0:
        raise PayloadError(f"dtype {dtype} is not a numeric dtype")
    if any(d < 0 for d in shape):
        raise PayloadError(f"negative dimension in shape {shape}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = len(data) - fp.tell()
    if have != need:
        raise PayloadError(f"shape {shape} of {dtype} needs {need} bytes of data, the array has {have}")
    if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != dtype.newbyteorder("="):
        raise PayloadError(f"header says {dtype} {shape}, the array fields {arr.dtype} {tuple(arr.shape)}")
    flat = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=fp.tell())
    return flat.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="), order="C", copy=True)


def update_bytes(record) -> int:
    """Bytes an update record carries: its arrays' data (``.npy`` headers included) or its codec payload."""
    if isinstance(record, ArrayRecord):
        return sum(len(arr.data) for arr in record.values())
    if isinstance(record, ConfigRecord) and isinstance(record.get("payload"), bytes):
        return len(record["payload"])
    raise PayloadError(f"update is neither arrays nor a codec payload, got {type(record).__name__}")


def update_digest(record) -> bytes:
    """A 16-byte digest of an update record's content (names, dtypes, shapes and bytes; or codec and payload)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    if isinstance(record, ArrayRecord):
        for k, arr in record.items():
            h.update(repr((k, arr.dtype, tuple(arr.shape), arr.stype, len(arr.data))).encode())
            h.update(arr.data)
    else:
        update_bytes(record)  # a codec payload, or PayloadError
        h.update(repr(record.get("codec")).encode())
        h.update(record["payload"])
    return h.digest()


def state_digest(state: Delta) -> bytes:
    """A 16-byte digest of an adapter state: its keys, dtypes, shapes and values, in key order."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        v = state[k].detach().to("cpu").contiguous()
        h.update(repr((k, str(v.dtype), tuple(v.shape))).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def wire_bytes(content: RecordDict) -> int:
    """Bytes of the serialized records as they cross the wire (protobuf size)."""
    return int(recorddict_to_proto(content).ByteSize())


def array_data_bytes(record: ArrayRecord) -> int:
    """Bytes of the raw tensor data inside an ArrayRecord, packed or not (without names and headers)."""
    return sum(v.numel() * v.element_size() for v in from_arrayrecord(record).values())

"""Read TensorFlow checkpoints (the V2 "tensor bundle" format) without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus ``PREFIX.data-SSSSS-of-NNNNN`` shards
(``tensorflow/core/util/tensor_bundle``):

- ``.index`` is a LevelDB-style table (``tensorflow/core/lib/io/table``): data blocks of
  prefix-compressed ``key -> value`` entries with a restart array, an index block pointing at
  them, and a 48-byte footer ending in the magic number ``0xdb4775248b80fb57``. Every block is
  followed by a compression byte (0: none; TF writes bundles uncompressed) and a masked CRC32C.
- The entry with the empty key is a ``BundleHeaderProto`` (number of shards, endianness);
  every other key is a tensor name whose value is a ``BundleEntryProto``: dtype, shape, shard,
  offset, size and the masked CRC32C of the tensor's bytes in that shard.
- Numeric tensors are stored as raw row-major bytes; string tensors as varint64 lengths, a
  masked CRC32C of those, then the bytes.

Only the few protobuf fields above are decoded, by a minimal wire-format parser, so nothing
but NumPy is needed. Checksums are verified (vectorised CRC32C), so a corrupt or truncated
download is an error naming the tensor, not silently wrong weights.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union, cast

import numpy as np

from .._utils import DeeplabError

PathLike = Union[str, "os.PathLike[str]"]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto DataType -> numpy dtype (little-endian).
DTYPES: Dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
DT_STRING = 7
DT_BFLOAT16 = 14
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
               8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128",
               19: "float16", 22: "uint32", 23: "uint64"}


class BundleError(DeeplabError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or uses a feature this reader lacks."""


# --------------------------------------------------------------------------- CRC32C

_CRC_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _crc_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _crc_update_py(crc: int, data: bytes) -> int:
    table = _TABLE_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _gf2_apply(columns: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Multiply 32x32 GF(2) matrix (``columns[i]`` = image of bit i) with each uint32 vector."""
    out = np.zeros_like(vectors)
    for bit in range(32):
        out ^= np.where((vectors >> np.uint32(bit)) & np.uint32(1), columns[bit], np.uint32(0))
    return out


def _zeros_operator(nbytes: int) -> np.ndarray:
    """Columns of the operator that feeds ``nbytes`` zero bytes through the raw CRC register."""
    one_byte = np.array([_crc_update_py(1 << bit, b"\0") for bit in range(32)], dtype=np.uint32)
    result = np.array([1 << bit for bit in range(32)], dtype=np.uint32)  # identity
    power = one_byte
    n = nbytes
    while n:
        if n & 1:
            result = _gf2_apply(power, result)
        n >>= 1
        if n:
            power = _gf2_apply(power, power)
    return result


def crc32c(data: Union[bytes, bytearray, memoryview]) -> int:
    """CRC-32C of ``data`` (as TF computes it, before masking).

    Large inputs are split into ``2**k`` equal chunks whose CRCs are computed side by side with
    NumPy, then combined pairwise (``crc(A || B) = Z_len(B) crc(A) ^ crc(B)``, ``Z`` the
    zero-byte operator), so a 100 MB tensor takes about a second.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    if n < 1 << 16:
        return _crc_update_py(0xFFFFFFFF, bytes(view)) ^ 0xFFFFFFFF
    streams = 1 << min(16, (n // 64).bit_length() - 1)
    length = n // streams
    body = np.frombuffer(view, dtype=np.uint8, count=streams * length).reshape(streams, length)
    regs = np.full(streams, 0xFFFFFFFF, dtype=np.uint32)
    for j in range(length):
        regs = _TABLE[(regs ^ body[:, j]) & np.uint32(0xFF)] ^ (regs >> np.uint32(8))
    crcs = regs ^ np.uint32(0xFFFFFFFF)
    chunk = length
    while len(crcs) > 1:
        shift = _zeros_operator(chunk)
        crcs = _gf2_apply(shift, crcs[0::2]) ^ crcs[1::2]
        chunk *= 2
    crc = int(crcs[0]) ^ 0xFFFFFFFF
    crc = _crc_update_py(crc, bytes(view[streams * length:]))
    return crc ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Inverse of TF's ``crc32c::Mask`` (rotate right 15 bits, plus a constant)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf / varints


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("varint too long")


def _proto_fields(buf: bytes) -> Iterator[Tuple[int, int, Union[int, bytes]]]:
    """Yield ``(field_number, wire_type, value)`` of a serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: Union[int, bytes]
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value = bytes(buf[pos:pos + size])
            if len(value) != size:
                raise BundleError("truncated protobuf field")
            pos += size
        elif wire == 5:
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a bundle (a decoded ``BundleEntryProto``)."""

    name: str
    dtype: int
    shape: Tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: Optional[int] = None
    sliced: bool = False

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, f"DataType {self.dtype}")


def _parse_shape(buf: bytes) -> Tuple[int, ...]:
    dims: List[int] = []
    for field, _, value in _proto_fields(buf):
        if field == 2:  # Dim
            size = 0
            for f2, _, v2 in _proto_fields(value):  # type: ignore[arg-type]
                if f2 == 1:
                    size = _signed64(int(v2))
            dims.append(size)
        elif field == 3 and value:
            raise BundleError("tensor of unknown rank")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    kwargs: Dict[str, object] = {"dtype": 0, "shape": ()}
    for field, _, value in _proto_fields(buf):
        if field == 1:
            kwargs["dtype"] = int(value)
        elif field == 2:
            kwargs["shape"] = _parse_shape(value)  # type: ignore[arg-type]
        elif field == 3:
            kwargs["shard_id"] = int(value)
        elif field == 4:
            kwargs["offset"] = _signed64(int(value))
        elif field == 5:
            kwargs["size"] = _signed64(int(value))
        elif field == 6:
            kwargs["crc32c"] = int(value)
        elif field == 7:
            kwargs["sliced"] = True
    return TensorEntry(name=name, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the table


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    end = offset + size + BLOCK_TRAILER_SIZE
    if offset < 0 or end > len(data):
        raise BundleError(f"{what}: block at {offset}+{size} lies outside the file ({len(data)} bytes); truncated?")
    block = data[offset:offset + size]
    compression = data[offset + size]
    stored = struct.unpack_from("<I", data, offset + size + 1)[0]
    if unmask_crc(stored) != crc32c(data[offset:offset + size + 1]):
        raise BundleError(f"{what}: checksum mismatch in the block at offset {offset}; the file is corrupt")
    if compression != 0:
        raise BundleError(
            f"{what}: block compressed with method {compression}; TensorFlow writes checkpoint indexes "
            "uncompressed and this reader supports only that (convert with --reader tensorflow)"
        )
    return block


def _block_entries(block: bytes, what: str) -> Iterator[Tuple[bytes, bytes]]:
    if len(block) < 4:
        raise BundleError(f"{what}: block too short")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise BundleError(f"{what}: bad restart array")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise BundleError(f"{what}: corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_table(path: PathLike) -> Iterator[Tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of a TF/LevelDB table file, in key order."""
    path = Path(path)
    data = path.read_bytes()
    what = str(path)
    if len(data) < FOOTER_SIZE:
        raise BundleError(f"{what}: {len(data)} bytes is too short for a checkpoint index; truncated?")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise BundleError(f"{what}: not a TensorFlow checkpoint index (bad magic number); truncated or another file?")
    pos = 0
    _meta_offset, pos = _varint(footer, pos)
    _meta_size, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    index = _read_block(data, index_offset, index_size, what)
    for _, handle in _block_entries(index, what):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        yield from _block_entries(_read_block(data, offset, size, what), what)


# --------------------------------------------------------------------------- the bundle


def resolve_prefix(path: PathLike) -> Path:
    """Turn what a user passes into a checkpoint prefix.

    Accepts the prefix itself (``dir/model.ckpt``), its ``.index`` or a ``.data-*`` file, or a
    directory holding exactly one checkpoint (or a ``checkpoint`` state file naming one).
    """
    p = Path(path).expanduser()
    name = p.name
    if name.endswith(".index"):
        p = p.with_name(name[: -len(".index")])
    elif ".data-" in name:
        p = p.with_name(name.split(".data-")[0])
    elif p.is_dir():
        state = p / "checkpoint"
        if state.is_file():
            for line in state.read_text(errors="replace").splitlines():
                if line.startswith("model_checkpoint_path:"):
                    candidate = Path(line.split(":", 1)[1].strip().strip('"'))
                    candidate = candidate if candidate.is_absolute() else p / candidate
                    if candidate.with_name(candidate.name + ".index").is_file():
                        return candidate
        indexes = sorted(p.glob("*.index"))
        if len(indexes) != 1:
            found = [i.name for i in indexes] or "none"
            raise BundleError(
                f"{p} is a directory with {len(indexes)} checkpoint indexes ({found}); pass the prefix, "
                "e.g. DIR/model.ckpt"
            )
        p = indexes[0].with_name(indexes[0].name[: -len(".index")])
    if not p.with_name(p.name + ".index").is_file():
        raise BundleError(
            f"no TensorFlow checkpoint at {path}: {p.name}.index does not exist in {p.parent}. Pass the "
            "prefix of a checkpoint (the part before .index / .data-00000-of-00001, e.g. model.ckpt), "
            "its .index file, or the model-zoo .tar.gz"
        )
    return p


class CheckpointReader:
    """A TF V2 checkpoint opened without TensorFlow.

    ``reader.entries`` maps every tensor name to its :class:`TensorEntry` (dtype, shape);
    ``reader.read(name)`` returns a NumPy array (strings as an object array of ``bytes``).

    Args:
        prefix: checkpoint prefix (see :func:`resolve_prefix` for what else is accepted).
        verify: check CRC32C checksums of the index blocks and of each tensor read.
    """

    def __init__(self, prefix: PathLike, *, verify: bool = True) -> None:
        self.prefix = resolve_prefix(prefix)
        self.verify = verify
        index = self.prefix.with_name(self.prefix.name + ".index")
        self.num_shards = 1
        big_endian = False
        self.entries: Dict[str, TensorEntry] = {}
        for key, value in read_table(index):
            if key == b"":
                for field, _, v in _proto_fields(value):
                    if field == 1:
                        self.num_shards = int(v)
                    elif field == 2:
                        big_endian = int(v) == 1
                continue
            name = key.decode("utf-8", errors="replace")
            entry = _parse_entry(name, value)
            self.entries[name] = entry
        self.big_endian = big_endian
        self._shards: Dict[int, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Tensor name -> shape, for every tensor in the checkpoint."""
        return {name: entry.shape for name, entry in self.entries.items()}

    def _shard(self, shard_id: int) -> np.memmap:
        if shard_id not in self._shards:
            path = self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")
            if not path.is_file():
                raise BundleError(
                    f"checkpoint data file {path} is missing; a checkpoint is the .index plus all "
                    f"{self.num_shards} .data-*-of-{self.num_shards:05d} file(s) - copy them together"
                )
            if path.stat().st_size == 0:
                self._shards[shard_id] = np.zeros(0, dtype=np.uint8)  # type: ignore[assignment]
            else:
                self._shards[shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._shards[shard_id]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a NumPy array of its stored dtype and shape."""
        if name not in self.entries:
            raise KeyError(f"no tensor {name!r} in {self.prefix}")
        entry = self.entries[name]
        if entry.sliced:
            raise BundleError(
                f"{name} is stored as slices of a partitioned variable, which this reader does not "
                "support; convert with --reader tensorflow"
            )
        shard = self._shard(entry.shard_id)
        if entry.offset < 0 or entry.offset + entry.size > len(shard):
            raise BundleError(
                f"{name}: bytes {entry.offset}..{entry.offset + entry.size} are beyond the end of data shard "
                f"{entry.shard_id} ({len(shard)} bytes); the checkpoint is truncated - download it again"
            )
        raw = shard[entry.offset:entry.offset + entry.size]
        count = int(np.prod(entry.shape, dtype=np.int64)) if entry.shape else 1
        if entry.dtype == DT_STRING:
            return self._decode_strings(entry, bytes(raw), count).reshape(entry.shape)
        if self.verify and entry.crc32c is not None and unmask_crc(entry.crc32c) != crc32c(cast(memoryview, raw)):  # an ndarray is a buffer; numpy's stubs say so from 3.12 on
            raise BundleError(f"{name}: checksum mismatch; the checkpoint data is corrupt - download it again")
        if entry.dtype == DT_BFLOAT16:
            bits = np.frombuffer(raw, dtype=">u2" if self.big_endian else "<u2", count=count)
            array = (bits.astype(np.uint32) << 16).view(np.float32)
            return array.reshape(entry.shape)
        if entry.dtype not in DTYPES:
            raise BundleError(f"{name}: unsupported dtype {entry.dtype_name}")
        dtype = DTYPES[entry.dtype]
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        if count * dtype.itemsize != entry.size:
            raise BundleError(
                f"{name}: {entry.size} bytes stored for a {entry.dtype_name} tensor of shape {entry.shape}; "
                "the index is corrupt"
            )
        array = np.frombuffer(raw, dtype=dtype, count=count).reshape(entry.shape)
        return array.astype(dtype.newbyteorder("="), copy=True)

    def _decode_strings(self, entry: TensorEntry, raw: bytes, count: int) -> np.ndarray:
        # [varint64 len_i]... [masked crc32c of the lengths] [bytes_i]... The entry's checksum
        # covers the lengths as little-endian uint32 (uint64 when they do not fit), the 4
        # checksum bytes and the string bytes.
        lengths = []
        pos = 0
        for _ in range(count):
            length, pos = _varint(raw, pos)
            lengths.append(length)
        checksum_bytes = raw[pos:pos + 4]
        pos += 4
        out = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            out[i] = raw[pos:pos + length]
            pos += length
        if pos != len(raw):
            raise BundleError(f"{entry.name}: string tensor does not fill its {len(raw)} bytes; corrupt checkpoint")
        if self.verify and entry.crc32c is not None:
            packed = b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths)
            covered = packed + checksum_bytes + b"".join(out.tolist())
            if unmask_crc(entry.crc32c) != crc32c(covered):
                raise BundleError(f"{entry.name}: checksum mismatch; the checkpoint data is corrupt - download it again")
        return out

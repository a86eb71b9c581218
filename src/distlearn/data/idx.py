"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a magic number, the dimensions, the bytes.

    magic  = 0x00000801 (labels, 1 dimension) or 0x00000803 (images, 3 dimensions), big-endian
    dims   = one big-endian uint32 per dimension
    data   = prod(dims) unsigned bytes

Files may be gzip-compressed (``.gz``) or raw. Anything else -- a wrong magic number, a truncated file, a
broken gzip stream, trailing bytes -- is a :class:`DataError` naming the file, what was found and what to do.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from distlearn.errors import DataError

__all__ = ["read_idx", "write_idx"]

_MAGIC = {1: 2049, 3: 2051}  # number of dimensions -> magic number of an unsigned-byte IDX file


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read {path}: {error.strerror}; check the path and its permissions"
        ) from error
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{path} is a damaged gzip file ({error}); delete it and download it again "
                "(or reinstall the package that provided it)"
            ) from error
    return raw


def read_idx(path: str | Path, *, dimensions: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gzip or raw), which must have ``dimensions`` dimensions."""
    path = Path(path)
    data = _read_bytes(path)
    expected_magic = _MAGIC[dimensions]
    header = 4 + 4 * dimensions
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic is not None and magic != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of {dimensions}-dimensional unsigned bytes: magic number "
            f"{magic:#010x}, expected {expected_magic:#010x}; is it the right file (images vs labels)?"
        )
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header}-byte IDX header; "
            "delete it and download it again"
        )
    shape = struct.unpack(f">{dimensions}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        state = "truncated" if len(data) - header < size else "longer than its header says"
        raise DataError(
            f"{path} is {state}: its header announces {shape} = {size:,} bytes of data, the file holds "
            f"{len(data) - header:,}; delete it and download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array of 1 or 3 dimensions as IDX (gzip when ``path`` ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">I", _MAGIC[array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)

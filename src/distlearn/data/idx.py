"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a magic number, the dimensions, the bytes.

    magic  = 0x00000801 (labels, 1 dimension) or 0x00000803 (images, 3 dimensions), big-endian
    dims   = one big-endian uint32 per dimension
    data   = prod(dims) unsigned bytes

Files may be gzip-compressed (``.gz``) or raw. Anything else -- a wrong magic number, a truncated file, a
broken gzip stream, trailing bytes, dimensions whose product overflows -- is a :class:`DataError` naming
the file, what was found and what to do.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from distlearn.errors import DataError

__all__ = ["read_idx", "read_idx_shape", "write_idx"]

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


def read_idx_shape(path: str | Path, *, dimensions: int) -> tuple[int, ...]:
    """The shape in IDX file ``path``'s header, read without the data (the checks :func:`read_idx` makes on
    the header, and, for a raw file, its size); a quick look before a job loads the whole file."""
    path = Path(path)
    header = 4 + 4 * dimensions
    gzipped = False
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as stream:
            data = stream.read(header)
    except (OSError, EOFError, zlib.error) as error:
        if gzipped:
            raise DataError(
                f"{path} is a damaged gzip file ({error}); delete it and download it again"
            ) from error
        raise DataError(f"cannot read {path}: {error}; check the path and its permissions") from error
    shape = _check_header(path, data, dimensions)
    if not gzipped:
        _check_size(path, shape, path.stat().st_size - header)
    return shape


def _check_header(path: Path, data: bytes, dimensions: int) -> tuple[int, ...]:
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
    size = math.prod(shape)  # exact: numpy's product of the dimensions could overflow int64 and wrap
    if size >= 2**63:
        raise DataError(
            f"{path} has a damaged header: its dimensions {shape} make {size:,} bytes, more than any file "
            "can hold; delete it and download it again"
        )
    return shape


def _check_size(path: Path, shape: tuple[int, ...], held: int) -> None:
    size = math.prod(shape)
    if held != size:
        state = "truncated" if held < size else "longer than its header says"
        raise DataError(
            f"{path} is {state}: its header announces {shape} = {size:,} bytes of data, the file holds "
            f"{held:,}; delete it and download it again"
        )


def read_idx(path: str | Path, *, dimensions: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gzip or raw), which must have ``dimensions`` dimensions."""
    path = Path(path)
    data = _read_bytes(path)
    shape = _check_header(path, data, dimensions)
    _check_size(path, shape, len(data) - (4 + 4 * dimensions))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array of 1 or 3 dimensions as IDX (gzip when ``path`` ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">I", _MAGIC[array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)

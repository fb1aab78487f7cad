"""Reading and writing safetensors files as numpy arrays (bfloat16 included).

Data flow:
  1. `index_safetensors(checkpoint_dir)` finds `model.safetensors` or the
     shards named by `model.safetensors.index.json` and reads only their JSON
     headers: name -> `TensorEntry` (file, dtype, shape, byte range). Names and
     shapes can therefore be checked before a single weight is read.
  2. `read_tensor(entry)` memory-maps the file and returns a read-only numpy
     view of that tensor (no copy; bfloat16 through `ml_dtypes`, which numpy
     alone cannot represent and `safetensors.numpy` refuses to read).
  3. `write_safetensors(path, arrays)` writes one file in the layout that
     `transformers` reads (metadata format "pt").

The format: 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first byte in `file`
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Tensor entries of one safetensors file (reads the header only)."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise SafetensorsError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{file} has an unreadable safetensors header ({err})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"tensor {name!r} in {file} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(file, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                    data_start + begin, data_start + end)
    return entries


def index_safetensors(checkpoint_dir: str | Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint directory, single file or sharded."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_FILE
    single_path = checkpoint_dir / SINGLE_FILE
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text()).get("weight_map", {})
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = checkpoint_dir / shard
            if not shard_path.exists():
                raise SafetensorsError(f"missing weights shard {shard} named by {index_path}")
            entries.update(read_header(shard_path))
        for name, shard in weight_map.items():
            if name not in entries or entries[name].file.name != shard:
                raise SafetensorsError(f"tensor {name!r} is not in shard {shard} as {index_path} says")
        return entries
    if single_path.exists():
        return read_header(single_path)
    raise SafetensorsError(f"missing weights: no {SINGLE_FILE} or {INDEX_FILE} in {checkpoint_dir}")


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """A read-only, memory-mapped view of one tensor (no copy)."""
    count = int(np.prod(entry.shape, dtype=np.int64))
    if entry.end - entry.begin != count * entry.dtype.itemsize:
        raise SafetensorsError(f"tensor at bytes {entry.begin}..{entry.end} of {entry.file} "
                               f"does not hold {entry.shape} of {entry.dtype}")
    if count == 0:
        return np.zeros(entry.shape, entry.dtype)
    data = np.memmap(entry.file, dtype=entry.dtype, mode="r", offset=entry.begin, shape=(count,))
    return data.reshape(entry.shape)


def write_safetensors(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """One safetensors file that `transformers` (torch) loads."""
    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})

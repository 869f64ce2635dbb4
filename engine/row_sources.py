"""Dataset files read row by row on demand, so a dataset of millions of rows costs an index, not
its rows, in memory.

    jsonl     one JSON value per line; blank lines are skipped. Opening scans the file once for the
              byte offset of each line (8 bytes a row); a row is one seek and one line.
    parquet   a row group is read when one of its rows is wanted, and the last few are kept; memory
              is a few row groups, so a file written with huge row groups (pyarrow's default is 1Mi
              rows) is read a whole group at a time: write image datasets with ~100-row groups, as
              Hugging Face `datasets` does (config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS).
    arrow     Arrow IPC stream files, as Hugging Face `datasets`' `save_to_disk` writes them
              (data-00000-of-0000N.arrow; the IPC file format is read too), memory-mapped: the OS
              pages rows in as they are read, as `datasets` itself does.
    folder    a `save_to_disk` folder (its state.json lists the arrow files in order) or a folder of
              .parquet, .arrow or .jsonl shards, read in name order as one dataset.

Rows are addressed by their position; `where` names the file and the row ("file:line" for jsonl,
"file:row N" otherwise), which is what every error message and default row id uses.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import DataError

log = logging.getLogger("pathorl.data")
CACHED_ROW_GROUPS = 4
LARGE_ROW_GROUP = 100_000
"""Rows of a parquet row group above which opening the file warns that each read is that large."""


@dataclass(frozen=True)
class Record:
    """One row as read: where it is, its value, and the folder its relative image paths resolve against."""

    where: str
    raw: Any
    base_dir: str


class RowSource(Protocol):
    path: str

    def __len__(self) -> int: ...

    def where(self, i: int) -> str: ...

    def record(self, i: int) -> Record: ...

    def schemas(self) -> list[tuple[str, Any]]:
        """(file, Arrow schema) of each columnar file, for column-type checks when opening."""
        ...


class JsonlSource:
    def __init__(self, path: str):
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self._offsets, self._lines = array("q"), array("I")
        with open(path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    self._offsets.append(pos)
                    self._lines.append(lineno)
                pos += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self._lines[i]}"

    def record(self, i: int) -> Record:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            line = f.readline()
        where = self.where(i)
        try:
            raw = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise DataError(f"{where}: not valid JSON ({e})") from None
        return Record(where, raw, self.base_dir)

    def schemas(self) -> list[tuple[str, Any]]:
        return []


class ParquetSource:
    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        try:
            meta = pq.read_metadata(path)
            self._schema = pq.read_schema(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = [0]
        for n in sizes:
            self._starts.append(self._starts[-1] + n)
        if sizes and max(sizes) > LARGE_ROW_GROUP:
            log.warning("%s has row groups of up to %d rows; each is read whole when one of its rows is served "
                        "(write it with smaller row groups, e.g. pyarrow.parquet.write_table(..., "
                        "row_group_size=1000), for bounded memory)", path, max(sizes))
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self._starts[-1]

    def where(self, i: int) -> str:
        return f"{self.path}:row {i}"

    def _group(self, g: int) -> Any:
        import pyarrow.parquet as pq

        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        try:
            table = pq.ParquetFile(self.path).read_row_group(g)
        except Exception as e:
            raise DataError(f"{self.path}: row group {g} cannot be read ({type(e).__name__}: {e})") from None
        self._cache[g] = table
        if len(self._cache) > CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return table

    def record(self, i: int) -> Record:
        g = bisect.bisect_right(self._starts, i) - 1
        raw = self._group(g).slice(i - self._starts[g], 1).to_pylist()[0]
        return Record(self.where(i), raw, self.base_dir)

    def schemas(self) -> list[tuple[str, Any]]:
        return [(self.path, self._schema)]


class ArrowSource:
    def __init__(self, path: str):
        import pyarrow as pa

        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        try:
            mapped = pa.memory_map(path)
            try:
                self._table = pa.ipc.open_stream(mapped).read_all()
            except pa.ArrowInvalid:
                mapped.seek(0)
                self._table = pa.ipc.open_file(mapped).read_all()
        except Exception as e:
            raise DataError(f"{path}: not a readable Arrow IPC file ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return self._table.num_rows

    def where(self, i: int) -> str:
        return f"{self.path}:row {i}"

    def record(self, i: int) -> Record:
        return Record(self.where(i), self._table.slice(i, 1).to_pylist()[0], self.base_dir)

    def schemas(self) -> list[tuple[str, Any]]:
        return [(self.path, self._table.schema)]


class Shards:
    """Several sources read as one, in order."""

    def __init__(self, path: str, parts: list[RowSource]):
        self.path = path
        self._parts = parts
        self._starts = [0]
        for part in parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[RowSource, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return self._parts[k], i - self._starts[k]

    def where(self, i: int) -> str:
        part, j = self._locate(i)
        return part.where(j)

    def record(self, i: int) -> Record:
        part, j = self._locate(i)
        return part.record(j)

    def schemas(self) -> list[tuple[str, Any]]:
        return [s for part in self._parts for s in part.schemas()]


_READERS = {".parquet": ParquetSource, ".arrow": ArrowSource, ".jsonl": JsonlSource}


def open_source(path: str) -> RowSource:
    """The rows of a file or folder (see the module docstring); DataError when there are none to read."""
    if os.path.isdir(path):
        return _folder(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file does not exist")
    return _READERS.get(os.path.splitext(path)[1], JsonlSource)(path)


def _folder(path: str) -> RowSource:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise DataError(f"{path}: a Hugging Face DatasetDict (splits {splits}); give one split's folder"
                        + (f", e.g. {os.path.join(path, splits[0])}" if splits else ""))
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        try:
            with open(state) as f:
                files = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a Hugging Face save_to_disk state file ({type(e).__name__}: {e})") from None
        return Shards(path, [ArrowSource(os.path.join(path, name)) for name in files])
    names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1] in _READERS)
    kinds = {os.path.splitext(n)[1] for n in names}
    if len(kinds) != 1:
        raise DataError(f"{path}: expected a Hugging Face save_to_disk folder or a folder of .parquet, .arrow or "
                        f".jsonl shards of one kind, found {sorted(kinds) or 'none'}")
    reader = _READERS[kinds.pop()]
    return Shards(path, [reader(os.path.join(path, n)) for n in names])

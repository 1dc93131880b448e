"""Reading the event Parquet in pieces for batch jobs that aggregate per piece and combine.

A piece is about `rows_per_piece` rows of whole row groups (small files grouped, a large file
split): one Ray Data task each, so a single large file still spreads over the cores, many small
files do not each pay a task and return a partial, and a task's memory stays bounded.
Each task reads its own piece with `iter_tables`: only the named columns, string columns as
Parquet dictionaries (the file already stores them so; decoding them to strings only to encode
them again was most of the read cost), missing columns as nulls (older exports lack newer
columns; their rows simply do not match anything that needs them).

    for piece in read_plan(files, 2_000_000):
        for path, groups in piece:
            for table in iter_tables(path, groups, ["user_id", "timestamp"], dictionary=["user_id"]):
                ...
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def read_plan(files: list[str], rows_per_piece: int) -> list[list[tuple[str, list[int]]]]:
    """Pieces of about `rows_per_piece` rows, each a list of (file, row group indices): runs of
    whole row groups, small files grouped together, large ones split, in file order."""
    plan, piece, rows = [], [], 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        groups = []
        for i in range(meta.num_row_groups):
            groups.append(i)
            rows += meta.row_group(i).num_rows
            if rows >= rows_per_piece:
                plan.append(piece + [(path, groups)])
                piece, groups, rows = [], [], 0
        if groups:
            piece.append((path, groups))
    if piece:
        plan.append(piece)
    return plan


def plan_items(plan: list[list[tuple[str, list[int]]]]) -> list[dict]:
    """A read plan as rows for `ray.data.from_items` (one row per piece)."""
    return [{"paths": [path for path, _ in piece], "row_groups": [groups for _, groups in piece]} for piece in plan]


def item_parts(items) -> list[tuple[str, list[int]]]:
    """Back from a pyarrow batch of `plan_items` rows to (file, row groups) pairs."""
    return [(path, groups) for paths, groups_list in zip(items["paths"].to_pylist(), items["row_groups"].to_pylist()) for path, groups in zip(paths, groups_list)]


def iter_tables(path: str, row_groups: list[int] | None, columns: list[str], dictionary: list[str] = (), batch_rows: int = 1 << 20) -> Iterator[pa.Table]:
    """Tables of at most `batch_rows` rows of `columns` (missing ones as null strings)."""
    names = set(pq.read_schema(path).names)
    f = pq.ParquetFile(path, read_dictionary=[c for c in dictionary if c in names])
    present = [c for c in columns if c in names]
    groups = list(range(f.metadata.num_row_groups)) if row_groups is None else row_groups
    for batch in f.iter_batches(batch_size=batch_rows, row_groups=groups, columns=present, use_threads=False):
        table = pa.Table.from_batches([batch])
        for c in columns:
            if c not in names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        yield table.select(columns)


def dictionary_codes(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Distinct string values and each row's index into them (-1 for null): a dictionary
    column (as `iter_tables` reads it) is used as is, any other column is encoded once. Work
    on the few distinct values, then index by the codes, instead of per-row string work."""
    if isinstance(column, pa.ChunkedArray):
        column = column.unify_dictionaries().combine_chunks() if pa.types.is_dictionary(column.type) else column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column.cast(pa.string()))
    return column.dictionary.cast(pa.string()), np.asarray(column.indices.fill_null(-1), dtype=np.int64)


def epoch_ms(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds since the epoch as int64 whatever the timestamp unit (0 where null), and
    which rows have one."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.timestamp("ms", tz=column.type.tz), safe=False)
    ms = column.cast(pa.int64())
    return np.asarray(ms.fill_null(0), dtype=np.int64), np.asarray(ms.is_valid(), dtype=bool)

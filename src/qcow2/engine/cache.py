"""Bounded metadata caches. Reads only for now: an LRU of decoded L2 tables keyed by host offset."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable


class TableCache:
    """LRU of whole tables (decoded to native-endian u64 arrays), bounded in bytes."""

    def __init__(self, table_bytes: int, budget_bytes: int,
                 loader: Callable[[int], array[int]]) -> None:
        self.capacity = max(2, budget_bytes // max(1, table_bytes))
        self._loader = loader
        self._tables: OrderedDict[int, array[int]] = OrderedDict()

    def get(self, host_offset: int) -> array[int]:
        t = self._tables.get(host_offset)
        if t is not None:
            self._tables.move_to_end(host_offset)
            return t
        t = self._loader(host_offset)
        self._tables[host_offset] = t
        if len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return t

    def put(self, host_offset: int, table: array[int]) -> None:
        """Cache `table` at `host_offset`, replacing whatever was cached there (a freed
        table's cluster reused for a new table must not bring the old one back)."""
        self._tables[host_offset] = table
        self._tables.move_to_end(host_offset)
        if len(self._tables) > self.capacity:
            self._tables.popitem(last=False)

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)

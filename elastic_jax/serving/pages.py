"""Host-side allocator of the shared KV page pool.

All pages are the same size, so there is no fragmentation to manage: a free list (a stack) gives
O(1) alloc and free per page. The pool's last page (id ``num_pages``, i.e. ``P - 1`` of the cache)
is the trash page of ``kv_cache``: it is never handed out, since padding writes land there.
"""

from __future__ import annotations

import numpy as np


class PageAllocator:
    """Hands out page ids ``0 .. num_pages - 1`` (the trash page ``num_pages`` is not among them).

    alloc(n) -> list of n page ids (raises when fewer are free); free(pages) returns them and
    raises on a page that is not currently allocated (double free or foreign id).
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 1")
        self.num_pages = num_pages
        # Low ids on top of the stack: a fresh pool hands out pages 0, 1, 2, ...
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._in_use = np.zeros(num_pages, bool)

    @property
    def trash_page(self) -> int:
        return self.num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise ValueError(
                f"asked for {n} pages, only {len(self._free)} of {self.num_pages} free"
            )
        pages = [self._free.pop() for _ in range(n)]
        self._in_use[pages] = True
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} is not a pool page (ids 0..{self.num_pages - 1})")
            if not self._in_use[p]:
                raise ValueError(f"page {p} freed twice (it is not allocated)")
            self._in_use[p] = False
            self._free.append(p)

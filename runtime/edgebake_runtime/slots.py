"""Shared memory between the service and a worker process: per slot, one input tensor and
every output tensor, laid out from the model card.

The memory is a memfd: it has no name in the filesystem (nothing to leak in /dev/shm when a
process is killed) and is freed when the last process holding it exits.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .card import Card, TensorSpec

ALIGN = 64


@dataclass(frozen=True)
class Region:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def _layout(card: Card, count: int) -> tuple[list[list[Region]], int]:
    specs: list[TensorSpec] = [card.inputs[0], *card.outputs]
    slots: list[list[Region]] = []
    offset = 0
    for _ in range(count):
        regions = []
        for spec in specs:
            dtype = np.dtype(spec.dtype)
            regions.append(Region(offset, tuple(int(x) for x in spec.shape), dtype))
            size = int(np.prod(spec.shape, dtype=np.int64)) * dtype.itemsize
            offset += (size + ALIGN - 1) // ALIGN * ALIGN
        slots.append(regions)
    return slots, max(offset, ALIGN)


class FrameSlots:
    def __init__(self, fd: int, card: Card, count: int, owner: bool) -> None:
        self.fd = fd
        self.count = count
        self.owner = owner
        self._regions, self.size = _layout(card, count)
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._views: list[list[np.ndarray[Any, Any]]] = [
            [np.ndarray(r.shape, r.dtype, buffer=self._map, offset=r.offset) for r in regions]
            for regions in self._regions]

    @classmethod
    def create(cls, card: Card, count: int) -> FrameSlots:
        _, size = _layout(card, count)
        fd = os.memfd_create("edgebake-frames", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, card, count, owner=True)

    @classmethod
    def attach(cls, fd: int, card: Card, count: int) -> FrameSlots:
        return cls(fd, card, count, owner=False)

    def input(self, slot: int) -> np.ndarray[Any, Any]:
        return self._views[slot][0]

    def outputs(self, slot: int) -> list[np.ndarray[Any, Any]]:
        return self._views[slot][1:]

    def check_matches(self, input_details: dict[str, Any],
                      output_details: list[dict[str, Any]]) -> None:
        """The interpreter's tensors must be what the card (and so the layout) says."""
        views = self._views[0]
        found = [input_details, *output_details]
        if len(found) != len(views):
            raise ValueError(f"model has {len(output_details)} outputs, the card lists "
                             f"{len(views) - 1}")
        for view, detail in zip(views, found, strict=True):
            shape = tuple(int(x) for x in detail["shape"])
            if shape != view.shape or np.dtype(detail["dtype"]) != view.dtype:
                raise ValueError(f"tensor {detail['name']}: {list(shape)} "
                                 f"{np.dtype(detail['dtype'])} in the model does not match "
                                 f"the card ({list(view.shape)} {view.dtype})")

    def close(self) -> None:
        self._views = []
        # a view still referenced somewhere keeps the mapping; it goes with the process
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)

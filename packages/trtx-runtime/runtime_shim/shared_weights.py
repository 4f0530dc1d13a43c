"""Decoded weight blobs shared by the sessions of one process: a blob two models of a bundle use is read once.

A bundle's models share one weight store (docs/BUNDLE_FORMAT.md), so two sessions of one bundle in one process would
read and decode the frames they share twice and hold two copies. ``shared_blobs`` hands out each decoded blob as one
read-only array per process while any session still holds it: the ONNX Runtime fallback's in-memory initializers
(fallback.py) and the host-memory refit (refit.py) take their blobs from here. The registry holds weak references
only: a blob lives as long as some session (or a refit in progress) keeps it, and then its memory goes.

What is shared was hashed frame by frame when this process first read it into its own memory (WeightReader), and is
read-only from then on, so every later user gets the bytes its manifest pins (docs/WEIGHT_STORE.md, "Verification").
A blob is shared only under the same key: the weight file's resolved path, the size and sha256 its manifest pins, the
frame digest, and the blob's whole record (its frames' offsets, sizes and digests, its encoding). Two manifests that
describe a blob differently, or another file, never get each other's bytes.

The GPU upload path (gpu/upload.py) stays per session: it decodes straight into pinned staging memory for one
engine's refit and frees it when the refit returns; TRT-RTX keeps its own copy of the weights on the GPU.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .store.reader import WeightReader
    from .store_index import Blob

# WeightReader.identity (the file's resolved path, pinned size and sha256, frame digest), then the blob's whole record
BlobKey = tuple[str, int, str, str, "Blob"]


class BlobRegistry:
    """Decoded blobs by key, each held by weak reference; a blob being read by one thread is waited for by others."""

    def __init__(self) -> None:
        # Re-entrant: a weak reference's callback may run on this thread while it holds the lock (a collection).
        self._lock = threading.RLock()
        self._live: dict[BlobKey, weakref.ref[np.ndarray]] = {}
        self._reading: dict[BlobKey, threading.Event] = {}

    def held(self, weight_file: str | os.PathLike[str] | None = None) -> tuple[int, int]:
        """(blobs, bytes) some session still holds, one copy each: of one weight file (its path), or of all."""
        where = None if weight_file is None else str(Path(weight_file).resolve())
        with self._lock:
            arrays = [ref() for key, ref in self._live.items() if where is None or key[0] == where]
        alive = [a for a in arrays if a is not None]
        return len(alive), sum(a.nbytes for a in alive)

    def blobs(self, reader: WeightReader, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """Blob index -> its decoded bytes (a read-only uint8 array) for ``indices`` of ``reader``'s store.

        Blobs alive in this process under the same key are reused; the others are read, verified and decoded with one
        ``reader.iter_blobs`` pass (its threads) and registered. A blob another thread is reading is waited for. A
        reader that checks otherwise than load() does (``verify_frames`` off, ``verify_raw`` on) shares nothing.
        """
        if not reader.verify_frames or reader.verify_raw:  # checked otherwise than a load checks: kept apart
            return {i: _read_only(_owning_array(buf)) for i, buf in _decoded(reader, list(dict.fromkeys(indices)))}
        keys = {i: (*reader.identity, reader.store.blobs[i]) for i in dict.fromkeys(indices)}
        out: dict[int, np.ndarray] = {}
        while len(out) < len(keys):
            mine: list[int] = []
            others: list[threading.Event] = []
            with self._lock:
                for i, key in keys.items():
                    if i in out:
                        continue
                    ref = self._live.get(key)
                    held = ref() if ref is not None else None
                    if held is not None:
                        out[i] = held
                    elif key in self._reading:
                        others.append(self._reading[key])
                    else:
                        self._reading[key] = threading.Event()
                        mine.append(i)
            if mine:
                self._read(reader, mine, keys, out)
            for event in others:  # then look again: what another thread failed to read is read here
                event.wait()
        return out

    def _read(
        self, reader: WeightReader, mine: list[int], keys: dict[int, BlobKey], out: dict[int, np.ndarray]
    ) -> None:
        try:
            for i, buf in _decoded(reader, mine):
                owner = _read_only(_owning_array(buf))  # shared: no session may change what another runs
                key = keys[i]
                with self._lock:
                    self._live[key] = weakref.ref(owner, self._forget(key))
                    self._reading.pop(key).set()
                out[i] = owner
        finally:
            with self._lock:  # a failed read leaves nothing claimed: a waiting thread tries itself
                for i in mine:
                    event = self._reading.pop(keys[i], None)
                    if event is not None:
                        event.set()

    def _after_fork(self) -> None:
        # The child has only the forking thread: a read another thread had claimed will never finish there.
        self._lock = threading.RLock()
        self._reading.clear()

    def _forget(self, key: BlobKey) -> Callable[[weakref.ref[np.ndarray]], None]:
        def forget(ref: weakref.ref[np.ndarray]) -> None:
            with self._lock:
                if self._live.get(key) is ref:
                    del self._live[key]

        return forget


def _decoded(reader: WeightReader, indices: list[int]) -> Iterator[tuple[int, memoryview]]:
    # One blob (a refit asks tensor by tensor): no thread pool for it, and one frame is decoded on this thread.
    if len(indices) == 1:
        buf = np.empty(reader.store.blobs[indices[0]].nbytes, dtype=np.uint8)
        reader.decode_blob_into(indices[0], buf.data)
        yield indices[0], buf.data
    else:
        yield from reader.iter_blobs(indices)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _owning_array(buf: memoryview) -> np.ndarray:
    # Views of an array keep the array that owns the memory alive, so the registry refers to that one: the weak
    # reference then lives exactly as long as the memory does.
    owner = buf.obj if isinstance(buf, memoryview) else None
    if isinstance(owner, np.ndarray) and owner.flags.owndata and owner.dtype == np.uint8 and owner.nbytes == len(buf):
        return owner
    return np.frombuffer(buf, dtype=np.uint8).copy()


REGISTRY = BlobRegistry()
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=REGISTRY._after_fork)


def shared_blobs(reader: WeightReader, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """``REGISTRY.blobs``: this process's one copy of each decoded blob (read-only), read where no session holds it."""
    return REGISTRY.blobs(reader, indices)

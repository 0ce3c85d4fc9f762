"""Memory between numpy and an IREE device that every device accepts.

iree.runtime's convenient paths import numpy's memory into the device without
copying: a numpy argument, `DeviceArray.to_host()` of a result, and a
`ParameterIndex` over numpy arrays or over a mapped archive. A device that
imports host memory natively wants it aligned: Vulkan drivers that have
VK_EXT_external_memory_host (Mesa's lavapipe, NVIDIA, AMD, Intel) to 4096
bytes (`minImportedHostPointerAlignment`), Apple's no-copy Metal buffers to a
page (16 KB on arm64). numpy's memory is aligned to 64 bytes at best, so on
such a device the first call failed. Here nothing depends on that import:

* arguments are copied into device-local buffers (`to_device`);
* results are read through a staging buffer the device allocates itself, or
  by mapping the result where the device's memory is host-visible (`to_numpy`);
* weights in memory are laid out in one page-aligned arena, every tensor at a
  page boundary (`index_of_weights`, `index_of_arrays`);
* an archive is mapped on the CPU, whose local devices take any host memory
  and use it in place, where the module's parameters stay constant, and
  streamed where an entry writes them; streamed into device buffers on Vulkan,
  whose driver reads it with an async file handle; and copied into a
  page-aligned arena on any other device (`index_of_archives`).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

# Apple's arm64 page; a multiple of the 4096 bytes Vulkan drivers ask for.
PAGE = 16 << 10
MAPPED, STREAMED = {"mmap": True}, {"mode": "file_async"}
# How each driver reads a parameter archive (ParameterIndex.load's options),
# by whether an entry of the module writes its parameters. The CPU uses a
# mapped archive in place; parameters that are written, the module copies into
# buffers of its own, so there the archive is streamed: a mapping would keep
# the file's pages resident beside the copy (497 MB for 124M's full
# fine-tuning). Any other driver (metal, cuda: not run here) gets a
# page-aligned copy in host memory.
ARCHIVE_LOADING = {"local-task": {False: MAPPED, True: STREAMED}, "local-sync": {False: MAPPED, True: STREAMED},
                   "vulkan": {False: STREAMED, True: STREAMED}}
# Bytes per read when an archive is read back into large folios.
READ_BLOCK = 16 << 20


def to_device(device, array: np.ndarray):
    """`array` copied into a device-local buffer of `device` (an rt.HalDevice)."""
    import iree.runtime as rt

    return rt.asdevicearray(device, array)  # which makes it C-contiguous first


def to_numpy(device, result) -> np.ndarray:
    """A fresh numpy copy of `result` (a DeviceArray that `device` returned).

    A copy, never a view: a mapped result is memory IREE reuses once the
    result is released, and would change under the caller.
    """
    import iree.runtime as rt

    # DeviceArray keeps its buffer view private; iree.runtime is pinned to 3.13.
    view = result._buffer_view
    buffer = view.get_buffer()
    dtype = rt.HalElementType.map_to_dtype(view.element_type)
    shape = list(view.shape)
    host_visible = int(rt.MemoryType.HOST_VISIBLE)
    if buffer.memory_type() & host_visible == host_visible and \
            buffer.allowed_usage() & int(rt.BufferUsage.MAPPING_SCOPED):
        return np.array(buffer.map().asarray(shape, np.dtype(dtype)), copy=True)
    staging = device.allocator.allocate_buffer(
        memory_type=int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE),
        allowed_usage=int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED),
        allocation_size=buffer.byte_length())
    semaphore = device.create_semaphore(0)
    device.queue_copy(buffer, staging, wait_semaphores=rt.HalFence.create_at(semaphore, 0),
                      signal_semaphores=rt.HalFence.create_at(semaphore, 1))
    rt.HalFence.create_at(semaphore, 1).wait()
    return np.array(staging.map().asarray(shape, np.dtype(dtype)), copy=True)


def byte_sizes(layout: dict) -> dict[str, int]:
    """name -> bytes of each tensor of `layout` (name -> (shape, dtype))."""
    return {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, (shape, dtype) in layout.items()}


def page_aligned_arena(sizes: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
    """A zeroed uint8 array starting on a page, a whole number of pages long,
    and the offset in it of each of `sizes`' entries, each on a page."""
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // PAGE) * PAGE
    raw = np.zeros(total + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + total], offsets


def index_of_weights(layout: dict[str, tuple[tuple[int, ...], np.dtype]], make) -> tuple[object, dict[str, np.ndarray]]:
    """A ParameterIndex over a page-aligned arena holding an entry of each
    (shape, dtype) of `layout`, filled one at a time with `make(name)` (an
    array, converted to the entry's dtype as it is copied), and the arena's
    views, one per entry.

    The index keeps the arena alive for IREE, which reads it when the module
    loads; the caller may drop its own arrays and keep the views instead.
    """
    import iree.runtime as rt

    nbytes = byte_sizes(layout)
    arena, offsets = page_aligned_arena(nbytes)
    placed = {}
    for name, (shape, dtype) in layout.items():
        placed[name] = arena[offsets[name]:offsets[name] + nbytes[name]].view(dtype).reshape(shape)
        placed[name][...] = make(name)
    handle = rt.FileHandle.wrap_memory(arena)
    index = rt.ParameterIndex()
    for name, value in placed.items():
        index.add_from_file_handle(name, handle, value.nbytes, offsets[name])
    return index, placed


def index_of_arrays(arrays: dict[str, np.ndarray]) -> tuple[object, dict[str, np.ndarray]]:
    """`index_of_weights` of a page-aligned copy of `arrays`, each as it is."""
    return index_of_weights({name: (a.shape, a.dtype) for name, a in arrays.items()}, arrays.__getitem__)


def index_of_archives(archives: list[tuple[Path, bool]], driver: str):
    """One ParameterIndex over the archives, each a (path, whether the module
    writes its parameters), read the way `driver` takes them (ARCHIVE_LOADING).
    Raises archive.ArchiveError if one is no whole archive."""
    import iree.runtime as rt

    from gpt2_iree.archive import load_index

    index = rt.ParameterIndex()
    loading = ARCHIVE_LOADING.get(driver)
    for path, written in archives:
        if loading and loading[written] is MAPPED:
            cache_in_large_folios(path)
        load_index(path, index, **(loading[written] if loading else MAPPED))
    if loading:
        return index
    return index_of_arrays({key: rt.parameter_index_entry_as_numpy_flat_ndarray(entry)
                            for key, entry in index.items()})[0]


def cache_in_large_folios(path: Path) -> None:
    """Linux: the file's cached pages dropped and read back in READ_BLOCK
    reads, which the kernel caches in folios of up to 2 MB and maps with one
    TLB entry each. A decode step reads every weight of a mapped archive: in
    4 KB pages that is 61 thousand TLB misses a token for 124M's float16, and
    the export's writes leave it so. 124M float16 decode 17.4-17.8 -> 15.1-15.4
    ms (docs/PERFORMANCE.md). Pages another process maps stay as they are;
    where posix_fadvise is missing (macOS), nothing happens."""
    if not hasattr(os, "posix_fadvise"):
        return
    # Anonymous and unmapped after: a heap buffer would stay in the process's peak.
    buffer = mmap.mmap(-1, READ_BLOCK)
    try:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while f.readinto(buffer):
                pass
    finally:
        buffer.close()

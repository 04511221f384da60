"""Refuse a KV cache that cannot fit, with the sizes, before allocating it.

numpy would otherwise fail with ArrayMemoryError (over ``ulimit -v``), or, because Linux overcommits, hand out the
buffers and let the kernel kill the process when they are first written. The room is the smaller of the machine's
available memory (``MemAvailable``: free plus reclaimable page cache) and what is left of the address-space limit.
"""

from __future__ import annotations

import os
import resource

import numpy as np

from appliance.errors import ResourceError
from appliance.model_config import KV_CACHE_DTYPES, ModelConfig


def kv_cache_bytes(config: ModelConfig, capacity: int, dtype: str = "fp32") -> int:
    """Keys and values of every layer for ``capacity`` positions (``[1, heads, capacity, head_dim]`` each), in the
    element type ``dtype`` names (a KV_CACHE_DTYPES key)."""
    itemsize = KV_CACHE_DTYPES[dtype].itemsize
    return config.num_layers * 2 * config.num_heads * capacity * config.head_dim * itemsize


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available_memory() -> tuple[int, str] | None:
    """(bytes this process can still allocate, what bounds it), or None where neither bound can be read."""
    room = []
    if (available := _mem_available()) is not None:
        room.append((available, "available memory"))
    if (left := _address_space_left()) is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        room.append((left, f"left under the {_size(soft)} address-space limit (ulimit -v)"))
    return min(room) if room else None


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def not_enough_memory(what: str, needed: int, advice: str,
                      room: tuple[int, str] | None = None) -> ResourceError:
    """The error for ``what`` needing ``needed`` bytes, with ``room`` (default: the room there is now)."""
    room = room if room is not None else available_memory()
    have = f"have {_size(room[0])} ({room[1]})" if room else "the allocation failed"
    return ResourceError(f"not enough memory: {what} needs {_size(needed)}, {have}; {advice}")


def require_memory(what: str, needed: int, advice: str) -> None:
    """Raise ResourceError when ``needed`` bytes do not fit in the room there is now."""
    room = available_memory()
    if room is not None and needed > room[0]:
        raise not_enough_memory(what, needed, advice, room)


def allocate_kv_cache(config: ModelConfig, capacity: int, dtype: str) -> list[np.ndarray]:
    """An engine's KV cache: keys and values of every layer, ``[1, heads, capacity, head_dim]`` each in the element
    type ``dtype`` names, in the graph's order (key, value per layer); refused with the sizes when they cannot fit."""
    shape = (1, config.num_heads, capacity, config.head_dim)
    what = f"the KV cache for {capacity} positions"
    needed = kv_cache_bytes(config, capacity, dtype)
    advice = "close other programs or lower the context budget (Settings)"
    require_memory(what, needed, advice)
    try:
        return [np.empty(shape, KV_CACHE_DTYPES[dtype]) for _ in range(2 * config.num_layers)]
    except MemoryError as exc:
        raise not_enough_memory(what, needed, advice) from exc

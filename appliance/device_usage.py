"""What an engine can say about the accelerator it runs on: device memory and utilisation.

An engine may offer ``device_usage() -> list[DeviceUsage]`` (the devices its replica uses, read cheaply: it is called
on every ``/metrics`` scrape). Engines that run on the CPU do not offer it, and the service then exports no
accelerator metrics at all rather than zeros: the process's own CPU and memory metrics cover them. A field the
runtime cannot tell is None and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceUsage:
    device: str  # e.g. "npu:0"
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilisation: float | None = None  # busy share of the last sampling period, 0 to 1


def device_usage(engine: object) -> list[DeviceUsage]:
    """The engine's devices, or [] for an engine without the hook (every CPU engine)."""
    hook = getattr(engine, "device_usage", None)
    return list(hook()) if callable(hook) else []

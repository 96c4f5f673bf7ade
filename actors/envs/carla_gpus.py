"""Which GPUs a node's launched CARLA servers render on when `carla.gpus` does not say.

UE4's Vulkan RHI takes `-graphicsadapter=N` as an index into vkEnumeratePhysicalDevices' list,
whose order is the Vulkan loader's, not CUDA's (fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID)
and not necessarily nvidia-smi's. CaRL matches them by PCI bus id (pynvml on one side, Vulkan's
VK_EXT_pci_bus_info on the other). Here the NVIDIA GPUs come from nvidia-smi, and their Vulkan
indices are their ranks in PCI bus order, the order in which the Linux Vulkan loader (1.3.2xx and
later) lists discrete GPUs of one vendor; `vulkaninfo --summary` prints the actual order to check
against `nvidia-smi --query-gpu=index,pci.bus_id,uuid --format=csv`.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

QUERY = ["nvidia-smi", "--query-gpu=index,pci.bus_id,uuid", "--format=csv,noheader"]


@dataclass(frozen=True)
class Gpu:
    index: int
    """nvidia-smi's number."""
    bus_id: str
    """PCI domain:bus:device.function, lower case, with nvidia-smi's 8-digit domain."""
    uuid: str


@functools.cache
def node_gpus() -> tuple[Gpu, ...]:
    """The GPUs nvidia-smi sees on this node (in this container); none without nvidia-smi."""
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no GPU list from nvidia-smi (%s): servers take the engine's default adapter", exc)
        return ()
    gpus = []
    for line in out.splitlines():
        if line.strip():
            index, bus_id, uuid = (part.strip() for part in line.split(","))
            gpus.append(Gpu(int(index), bus_id.lower(), uuid))
    return tuple(gpus)


def vulkan_index(gpus: tuple[Gpu, ...], gpu: Gpu) -> int:
    """`gpu`'s adapter index: its rank among the node's GPUs in PCI bus order."""
    return sorted(g.bus_id for g in gpus).index(gpu.bus_id)


def server_adapters(learner_gpu: int) -> list[int]:
    """Vulkan indices for the node's servers: none (the engine's default) on a node with fewer
    than two GPUs; otherwise every GPU but the learner's (nvidia-smi index `learner_gpu`, -1 for
    none), in PCI bus order."""
    gpus = node_gpus()
    if len(gpus) < 2:
        return []
    chosen = sorted((g for g in gpus if g.index != learner_gpu), key=lambda g: g.bus_id)
    adapters = [vulkan_index(gpus, g) for g in chosen]
    log.info("CARLA servers render on GPUs %s (nvidia-smi), Vulkan adapters %s; GPU %d is the learner's",
             [g.index for g in chosen], adapters, learner_gpu)
    return adapters

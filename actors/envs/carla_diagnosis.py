"""Why a CARLA server exited before it answered: the likely causes, read from its log.

The binary logs through UE4: without `-stdout` a shipping build prints two lines to the console
("4.26.2-0+++UE4+Release-4.26 522 0", "Disabling core dumps.") and writes its log only to
CarlaUE4/Saved/Logs/CarlaUE4.log, one file for every server of the install (the last start's; the
previous one is renamed to CarlaUE4-backup-<date>.log). `-stdout` adds UE4's console output device,
which passes Display, Warning and Error lines; `-FullStdOutLogOutput` raises it to every verbosity,
so that the LogCarla lines (Log verbosity) reach stdout too (UE4's FOutputDeviceStdOutput). So each
launch gets LOG_FLAGS, and each slot's carla_<slot>.log holds the server's own log.
"""

from __future__ import annotations

import re

LOG_FLAGS = ("-stdout", "-FullStdOutLogOutput")
BANNER_LINES = ("4.26.2-0+++UE4+Release-4.26 522 0", "Disabling core dumps.")
"""What a CARLA 0.9.16 shipping build prints to the console without `-stdout`."""

VULKAN = ("no working Vulkan driver in the container: the NVIDIA Vulkan ICD (/usr/share/vulkan/icd.d/nvidia_icd.json "
          "or /etc/vulkan/icd.d/) with the driver's graphics libraries, which the NVIDIA container runtime mounts "
          "only with NVIDIA_DRIVER_CAPABILITIES including 'graphics' (or 'all'); check with `vulkaninfo --summary` "
          "in the container")
PORT = "a port of the server is taken by another process (carla.port; each server uses RPC, RPC+1 and RPC+2)"
GPU_MEMORY = "the GPU is out of memory (other servers or the learner on the same GPU: carla.gpus, carla.learner_gpu)"
RENDER_HANG = "the render thread hung, often a GPU/driver problem or an overloaded GPU"
CRASH = "the engine crashed (signal 11) before answering"

KNOWN_LINES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.IGNORECASE), cause) for p, cause in (
    # UE4 4.26 VulkanRHI: vkCreateInstance without an ICD, no physical device, no loader library
    (r"compatible Vulkan driver \(ICD\)|VK_ERROR_INCOMPATIBLE_DRIVER|Vulkan device not available"
     r"|support Vulkan were found|Unable to load Vulkan library|libvulkan\.so", VULKAN),
    # CARLA's RPC or streaming server failing to bind (rpclib/asio: "Exception thrown: bind: ...")
    (r"bind: Address already in use", PORT),
    # VulkanRHI::VerifyVulkanResult on a failed allocation; UE4's out-of-video-memory message
    (r"VK_ERROR_OUT_OF_DEVICE_MEMORY|Out of video memory", GPU_MEMORY),
    (r"GameThread timed out waiting for RenderThread", RENDER_HANG),
    (r"Signal 11 caught|Signal=11", CRASH),
))

ENGINE_LINE = re.compile(r"^\[\d{4}\.\d\d\.\d\d-|^Log\w+:", re.MULTILINE)
"""A line UE4's log devices print (with or without the timestamp prefix): a log that has none
exited before the engine logged anything."""


def likely_causes(log: str, returncode: int | None) -> list[str]:
    """The causes the log's known lines point to; for a log that names none, the usual suspects."""
    causes = [cause for pattern, cause in KNOWN_LINES if pattern.search(log)]
    if causes:
        return causes
    if not ENGINE_LINE.search(log):
        # CARLA issues #8079, #5743: with -RenderOffScreen and no usable Vulkan the binary exits
        # quietly; without -stdout nothing reaches the console in any case.
        return [VULKAN, "a server_command that is not CARLA's binary, or flags it rejects"]
    return [VULKAN, PORT, GPU_MEMORY] if returncode != 0 else ["the server exited normally: was it told to quit?"]


def explain(log: str, returncode: int | None) -> str:
    return "likely causes:\n" + "\n".join(f"  - {cause}" for cause in likely_causes(log, returncode))

"""Stand-in for the CARLA server (CarlaUE4-Linux-Shipping): listens on `-carla-rpc-port=N`, answers the double's version ('v'),
incarnation ('h'), booted map ('m'), spawn ('s'), tick ('t') and map-load ('l') requests, and can
be told to fail. It boots the map its first argument that is not a flag names, as UE4 does
(`/Game/Carla/Maps/Town01`), else CARLA 0.9.16's default, Town10HD_Opt; a first argument
`CarlaUE4` is the project name, which CarlaUE4.sh passes the packaged binary before the map. A map load takes
FAKE_CARLA_LOAD_S seconds (default 0): a real one takes seconds to minutes.

It logs as the shipping binary does (UE4's log devices): two lines always reach stdout (the
engine version and "Disabling core dumps."); every log line goes to CarlaUE4/Saved/Logs/CarlaUE4.log
under FAKE_CARLA_HOME (default: <tmp>/fake_carla_<uid>), one file shared by every server of the
install, the previous start's renamed to a backup; stdout gets the lines of Display verbosity and
above only with -stdout, and all of them (LogCarla's Log lines too) with -FullStdOutLogOutput.
The messages are stand-ins, except the failure lines of real builds the faults print.

It keeps a child process in its process group (its pid goes to stderr as 'child pid N'), as a
server started by a script (CarlaUE4.sh starts the binary as a child) has one, so tests can check
the whole group dies.

Faults come from the file named by FAKE_CARLA_FAULTS: each launch consumes its first line,
'hang K' (stop answering after K ticks, staying alive), 'die K' (SIGSEGV after K ticks, as CARLA's
signal 11), 'refuse' (exit before listening), 'novulkan' (UE4's message for a missing Vulkan
driver, exit code 1, as RequestExitWithStatus), 'oom' (a failed GPU allocation, then signal 11) or
'ok'. A taken RPC port fails the launch as CARLA's RPC server does ("bind: Address already in use").
FAKE_CARLA_CRASH_AFTER_S=S (or a range 'A-B', drawn per launch) makes every launch crash with
signal 11 S seconds after it started listening: servers that crash on a schedule.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BANNER = ("4.26.2-0+++UE4+Release-4.26 522 0", "Disabling core dumps.")
LEVELS = {"Fatal": 1, "Error": 2, "Warning": 3, "Display": 4, "Log": 5}


class EngineLog:
    """UE4's log devices: the file always, stdout from Display (-stdout) or from Log (-FullStdOutLogOutput) up."""

    def __init__(self, args: list[str]) -> None:
        flags = {a.lower() for a in args}
        self.stdout_level = 5 if "-fullstdoutlogoutput" in flags and "-stdout" in flags else 4 if "-stdout" in flags else 0
        home = Path(os.environ.get("FAKE_CARLA_HOME") or Path(tempfile.gettempdir()) / f"fake_carla_{os.getuid()}")
        logs = home / "CarlaUE4" / "Saved" / "Logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            (logs / "CarlaUE4.log").rename(logs / f"CarlaUE4-backup-{time.strftime('%Y.%m.%d-%H.%M.%S')}-{os.getpid()}.log")
        except OSError:
            pass
        self.file = open(logs / "CarlaUE4.log", "a")
        for line in BANNER:
            print(line, flush=True)

    def __call__(self, category: str, verbosity: str, text: str) -> None:
        line = time.strftime("[%Y.%m.%d-%H.%M.%S:000][  0]") + category + (
            ": " if verbosity == "Log" else f": {verbosity}: ") + text
        self.file.write(line + "\n")
        self.file.flush()
        if LEVELS[verbosity] <= self.stdout_level:
            print(line, flush=True)


def crash(log: EngineLog) -> None:
    """CARLA's signal 11: UE4's crash handler logs it, then the signal is raised again."""
    log("LogCore", "Error", "Signal 11 caught.")
    log("LogCore", "Error", "CommonUnixCrashHandler: Signal=11")
    os.kill(os.getpid(), signal.SIGSEGV)


def crash_after() -> float | None:
    spec = os.environ.get("FAKE_CARLA_CRASH_AFTER_S")
    if not spec:
        return None
    low, _, high = spec.partition("-")
    return random.Random(os.getpid()).uniform(float(low), float(high or low))


def next_fault() -> tuple[str, int]:
    path = os.environ.get("FAKE_CARLA_FAULTS")
    if not path or not os.path.exists(path):
        return "ok", 0
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[1:]))
    words = (lines[0] if lines else "ok").split()
    return words[0], int(words[1]) if len(words) > 1 else 0


def main() -> None:
    port = next(int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("-carla-rpc-port="))
    args = sys.argv[2:] if sys.argv[1:2] == ["CarlaUE4"] else sys.argv[1:]
    town = next((a for a in args if not a.startswith("-")), "Town10HD_Opt").rsplit("/", 1)[-1]
    fault, after = next_fault()
    print(f"fake CARLA server pid {os.getpid()} args {' '.join(sys.argv[1:])} fault {fault} {after}", file=sys.stderr, flush=True)
    if fault == "refuse":
        sys.exit(3)
    log = EngineLog(sys.argv[1:])
    log("LogInit", "Display", f"Running engine for game: CarlaUE4, map {town}")
    log("LogCarla", "Log", "Loading CARLA settings from the command line")
    adapter = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.lower().startswith("-graphicsadapter=")), "0")
    if fault == "novulkan":  # vkCreateInstance without an ICD (UE4 4.26 VulkanRHI.cpp)
        log("LogVulkanRHI", "Error", "Cannot find a compatible Vulkan driver (ICD).")
        sys.exit(1)
    log("LogVulkanRHI", "Display", f"Using Device {adapter}")
    if fault == "oom":
        log("LogVulkanRHI", "Error", "VulkanRHI::vkAllocateMemory(Device, &Info, VULKAN_CPU_ALLOCATOR, &Handle) "
            "failed, VkResult=-2 with error VK_ERROR_OUT_OF_DEVICE_MEMORY")
        crash(log)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", port))
    except OSError as exc:
        log("LogCarla", "Error", f"Exception thrown: bind: {os.strerror(exc.errno)}")
        crash(log)
    log("LogCarla", "Log", f"Listening on RPC port {port}")
    if (seconds := crash_after()) is not None:
        threading.Timer(seconds, crash, args=(log,)).start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"child pid {child.pid}", file=sys.stderr, flush=True)
    ticks = 0
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        nonlocal ticks
        with conn:
            while op := conn.recv(1):
                if op == b"t":
                    with lock:
                        ticks += 1
                        n = ticks
                    if fault == "hang" and n > after:
                        time.sleep(3600)
                    if fault == "die" and n > after:
                        crash(log)
                if op == b"l":
                    time.sleep(float(os.environ.get("FAKE_CARLA_LOAD_S", "0")))
                reply = {b"v": "0.9.16", b"h": str(os.getpid()), b"m": town}.get(op, "k")
                conn.sendall(reply.encode() + b"\n")

    server.listen()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

"""Stand-in for the CARLA server (CarlaUE4-Linux-Shipping): listens on `-carla-rpc-port=N`, answers the double's version ('v'),
incarnation ('h'), booted map ('m'), spawn ('s'), tick ('t') and map-load ('l') requests, and can
be told to fail. It boots the map its first argument that is not a flag names, as UE4 does
(`/Game/Carla/Maps/Town01`), else CARLA 0.9.16's default, Town10HD_Opt; a first argument
`CarlaUE4` is the project name, which CarlaUE4.sh passes the packaged binary before the map. A map load takes
FAKE_CARLA_LOAD_S seconds (default 0): a real one takes seconds to minutes.

It keeps a child process in its process group (its pid goes to stderr as 'child pid N'), as a
server started by a script (CarlaUE4.sh starts the binary as a child) has one, so tests can check
the whole group dies.

Faults come from the file named by FAKE_CARLA_FAULTS: each launch consumes its first line,
'hang K' (stop answering after K ticks, staying alive), 'die K' (SIGSEGV after K ticks, as CARLA's
signal 11), 'refuse' (exit before listening) or 'ok'.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time


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
                        os.kill(os.getpid(), signal.SIGSEGV)
                if op == b"l":
                    time.sleep(float(os.environ.get("FAKE_CARLA_LOAD_S", "0")))
                reply = {b"v": "0.9.16", b"h": str(os.getpid()), b"m": town}.get(op, "k")
                conn.sendall(reply.encode() + b"\n")

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

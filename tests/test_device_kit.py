"""The GPU-machine kit (`deploy/device/`): Ray slimmed to fit a device call, and the check script."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "device"))
import kit  # noqa: E402


def test_slim_ray_drops_what_a_local_cluster_never_loads_and_keeps_executables(tmp_path):
    wheel = tmp_path / "ray-0-cp312-cp312-manylinux2014_x86_64.whl"
    files = {"ray/__init__.py": 0o644, "ray/core/src/ray/raylet/raylet": 0o755, "ray/jars/ray_dist.jar": 0o644,
             "ray/dashboard/client/build/index.html": 0o644, "ray/dashboard/head.py": 0o644,
             "ray/dashboard/x.js.map": 0o644, "ray-0.dist-info/METADATA": 0o644}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, mode in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, b"x")
    with tarfile.open(kit.slim_ray(wheel, tmp_path)) as tar:
        members = {m.name: m.mode for m in tar.getmembers() if m.isfile()}
    assert set(members) == {"ray/__init__.py", "ray/core/src/ray/raylet/raylet", "ray/dashboard/head.py",
                            "ray-0.dist-info/METADATA"}
    assert members["ray/core/src/ray/raylet/raylet"] & 0o111


@pytest.mark.parametrize("kit_dir, message", [("none", "unknown step 'nope'"), ("missing-kit", "no missing-kit/")])
def test_check_script_reports_what_it_cannot_do(tmp_path, kit_dir, message):
    env = {**os.environ, "OUT": str(tmp_path), "KIT": kit_dir, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "deploy/device/check.sh", "nope"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert message in (tmp_path / "summary.txt").read_text()
    assert done.returncode == (1 if kit_dir == "missing-kit" else 0)

"""Fetch the ONNX backend test data of the onnx 1.17 wheel into .cache/.

onnx 1.23 no longer ships the 1288 `node` tests; the 1.17 wheel does.  The
wheel is downloaded once with pip (PyPI is the only network this needs) and
only its onnx/backend/test/data/ folder is kept.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".cache" / "onnx-backend-data" / "1.17.0"
PREFIX = "onnx/backend/test/data/"


def main() -> int:
    done = DEST / ".complete"
    if done.exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "-d", tmp, "onnx==1.17.0"]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("onnx-1.17.0-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.startswith(PREFIX) and not n.endswith("/")]
            staging = DEST.with_name(DEST.name + ".partial")
            for name in members:
                target = staging / name[len(PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    if DEST.exists():
        import shutil

        shutil.rmtree(DEST)
    staging.rename(DEST)
    done.touch()
    print(f"backend test data: {len(members)} files in {DEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

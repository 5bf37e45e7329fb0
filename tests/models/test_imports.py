"""``import vit`` loads the models only: never the tools, nor what only the tools need."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import torch, fastvit_kernels  # these load what they load (torch itself imports argparse)
before = set(sys.modules)
import vit, vit.fast, vit.weights, vit.factory
new = sorted(set(sys.modules) - before)
print(",".join(new))
"""


def test_import_vit_loads_no_tool_code():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip().split(",")
    assert "vit" in new and "vit.fast" in new  # the probe did import them here
    tools = [m for m in new if m == "vit.tools" or m.startswith("vit.tools.")]
    assert not tools, f"import vit loaded tool modules: {tools}"
    for name in ("argparse", "PIL", "tqdm"):
        assert not [m for m in new if m == name or m.startswith(name + ".")], f"import vit loaded {name}"

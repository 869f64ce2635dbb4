"""Our Triton package is a top-level `kernels`, which is also the import name of Hugging Face's
hub-kernels library. transformers probes for that library by import name and distribution version
(`is_kernels_available`) and, when it believes it is there, does `from kernels import get_kernel`.
It must never take ours for it, nor import ours while probing."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

PROBE = """
import importlib.util, json, sys
from transformers.utils import import_utils as iu
from transformers.integrations import hub_kernels  # imports hub kernels when it believes they exist
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "origin": spec.origin,
    "available": iu.is_kernels_available(),
    "seen_version": iu._is_package_available("kernels", return_version=True)[1],
    "imported_ours": "kernels" in sys.modules,
    "min": iu.KERNELS_MIN_VERSION, "max": iu.KERNELS_MAX_VERSION,
}))
"""


def test_transformers_never_takes_our_kernels_package_for_hub_kernels():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(probe["origin"]).parent.name == "kernels"
    assert probe["available"] is False
    assert probe["imported_ours"] is False, "transformers imported pathorl's kernels package while probing"
    # transformers reads the version of the distribution that owns the import name `kernels`: ours.
    assert probe["seen_version"] == version("pathorl")
    assert not Version(probe["min"]) <= Version(version("pathorl")) < Version(probe["max"]), (
        "pathorl's version falls in the range transformers accepts for hub-kernels: it would import ours")

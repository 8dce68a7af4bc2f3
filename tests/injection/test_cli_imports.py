"""The sidecar image has no kopf: `modelplane serve` must not import the operator's stack,
even though `modelplane operator` and `modelplane webhook` declare their flags in the same parser.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from modelplane_cli.main import build_parser
build_parser().parse_args(["serve", "--config", "router.yaml"])
print(",".join(sorted(m for m in ("kopf", "cryptography") if m in sys.modules)))
"""


def test_building_the_cli_parser_loads_neither_kopf_nor_cryptography() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""

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


SERVE_PROBE = """
import sys
from modelplane_cli.main import build_parser
build_parser("serve").parse_args(["serve", "--config", "router.yaml"])
print(",".join(sorted(m for m in sys.modules if m.startswith("modelplane_operator"))))
"""


def test_the_serve_command_loads_none_of_the_operators_modules() -> None:
    # The operator's and webhook's flags are declared in the operator's modules; a sidecar
    # process (`modelplane serve`) has no use for them (~0.6 MB of memory).
    loaded = subprocess.run(
        [sys.executable, "-c", SERVE_PROBE], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_the_operator_commands_still_get_their_flags() -> None:
    from modelplane_cli.main import build_parser

    args = build_parser("operator").parse_args(["operator", "--leader-election"])
    assert args.leader_election is True
    argv = ["webhook", "--sidecar-image", "modelplane:dev", "--tls-namespace", "modelplane"]
    args = build_parser("webhook").parse_args(argv)
    assert args.tls_namespace == "modelplane"
    assert build_parser().parse_args(argv).tls_namespace == "modelplane"

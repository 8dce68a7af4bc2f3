"""The chart ships exactly the generated CRDs: charts/modelplane/crds/ links to crds/.

Helm follows symlinks inside a chart (and `helm package` stores their content), so the links
keep one source of truth; this test fails when a CRD is added to crds/ without a link, or a link
points somewhere else.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "crds"
CHART_CRDS = REPO / "charts" / "modelplane" / "crds"


def test_chart_crds_are_the_generated_crds() -> None:
    generated = {path.name: path.read_bytes() for path in sorted(GENERATED.glob("*.yaml"))}
    shipped = {path.name: path.read_bytes() for path in sorted(CHART_CRDS.iterdir())}

    assert generated, "crds/ is empty: run `modelplane crds`"
    missing = sorted(set(generated) - set(shipped))
    assert not missing, (
        f"charts/modelplane/crds/ lacks {missing}: "
        "cd charts/modelplane/crds && ln -s ../../../crds/<file> ."
    )
    assert sorted(set(shipped) - set(generated)) == [], "charts/modelplane/crds/ has extra files"
    assert shipped == generated


def test_chart_crds_are_links_not_copies() -> None:
    for path in CHART_CRDS.iterdir():
        assert path.is_symlink(), f"{path} should be a symlink into crds/, not a copy"
        assert path.resolve().parent == GENERATED.resolve()

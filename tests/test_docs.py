"""Every section of the theory page cited in code, tests, benchmarks and notebooks (``theory.md#<anchor>``) exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_theory_citation_points_to_an_anchor_of_the_page():
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', (ROOT / "docs" / "theory.md").read_text()))
    files = [p for d in ("signal_drift", "tests", "benchmarks", "notebooks") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".ipynb")]  # fmt: skip
    cited = {
        (p.relative_to(ROOT), a)
        for p in files
        for a in re.findall(r"docs/theory\.md#([a-z0-9-]+)", p.read_text())
    }
    assert len(cited) >= 5 and {"objects", "prop-1", "prop-3", "prop-4", "lora-alpha", "findings"} <= anchors
    assert sorted((str(p), a) for p, a in cited if a not in anchors) == []

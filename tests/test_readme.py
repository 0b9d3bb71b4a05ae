"""The README's Python example runs as written (and asserts its own result)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_numbers_come_from_the_committed_json():
    """Every experiment number in the README is rendered from experiments/*.json (signal_drift.report)."""
    from signal_drift.report import FRAGMENTS, render

    text = README.read_text()
    used = set(re.findall(r"<!-- begin: ([\w-]+) -->", text))
    assert used == set(FRAGMENTS), (
        f"fragments without a README block or blocks without a fragment: {used ^ set(FRAGMENTS)}"
    )
    assert render(text) == text, (
        "README numbers differ from experiments/*.json: run python -m signal_drift.report"
    )


def test_report_check_flags_a_drifted_number(tmp_path):
    from signal_drift.report import ROOT, main

    text = README.read_text()
    drifted = re.sub(r"(<!-- begin: fig8-table -->\n.*?)\d\.\d", r"\g<1>9.9", text, count=1, flags=re.S)
    assert drifted != text
    (tmp_path / "README.md").write_text(drifted)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    assert main(["--check", "--readme", str(tmp_path / "README.md")]) == 1
    (tmp_path / "README.md").write_text(text)
    assert main(["--check", "--readme", str(tmp_path / "README.md")]) == 0

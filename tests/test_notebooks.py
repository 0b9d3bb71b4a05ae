"""The notebooks run end to end against the library (at a small width)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name,dim,needle", [("fig8", "8", "slope signal 2.0000"), ("fig2", "6", "SDR slope vs η")]
)
def test_notebook_executes(tmp_path, monkeypatch, name, dim, needle):
    monkeypatch.setenv("SIGNAL_DRIFT_NB_DIM", dim)
    monkeypatch.setenv("SIGNAL_DRIFT_NB_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert needle in outputs

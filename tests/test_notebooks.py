"""The notebooks run end to end against the library (at a small width)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]


def test_fig8_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNAL_DRIFT_NB_DIM", "8")
    monkeypatch.setenv("SIGNAL_DRIFT_NB_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "fig8.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / "fig8.png").stat().st_size > 0
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "slope signal 2.0000" in outputs


def test_fig2_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNAL_DRIFT_NB_DIM", "6")
    monkeypatch.setenv("SIGNAL_DRIFT_NB_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "fig2.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / "fig2.png").stat().st_size > 0

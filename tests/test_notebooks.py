"""The notebooks execute end to end against the full-size synthetic checkpoint, and are committed without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = [
    "01_quickstart.ipynb",
    "02_zero_shot_and_search.ipynb",
    "03_downstream_classifier.ipynb",
    "04_tagging_and_events.ipynb",
]


def test_the_notebooks_exist_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert [p.name for p in NOTEBOOKS] == NAMES
    for path in NOTEBOOKS:
        raw = json.loads(path.read_text(encoding="utf-8"))  # nbformat.read adds missing cell ids with a warning
        assert all("id" in c for c in raw["cells"]), f"{path.name}: a cell without an id (nbformat 4.5)"
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"
        assert "M2D2_NOTEBOOK_MODEL" in nb.cells[1].source


@pytest.fixture(scope="module")
def converted_checkpoint(parity_checkpoint, tmp_path_factory) -> Path:
    """The seed-0 checkpoint in our safetensors format: each notebook loads it in a fraction of a second."""
    from m2d2_embed import convert

    return convert(parity_checkpoint, tmp_path_factory.mktemp("nb_model") / "m2d2-synthetic")


@pytest.fixture(scope="module")
def converted_tagger(geometry_checkpoint, tmp_path_factory) -> Path:
    """A synthetic checkpoint in the layout of upstream's AudioSet fine-tuned release (EVAR head, 527 classes)."""
    from m2d2_embed import convert

    return convert(geometry_checkpoint("evar_as_ft"), tmp_path_factory.mktemp("nb_tagger") / "m2d-tagging-synthetic")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, request, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    if name.startswith("03"):
        pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[1]
    model = request.getfixturevalue("converted_tagger" if name.startswith("04") else "converted_checkpoint")
    monkeypatch.setenv("M2D2_NOTEBOOK_MODEL", str(model))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(root / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

"""The chat panel in a real JupyterLab, driven through Debian's Chromium."""

from __future__ import annotations


def test_widget_lab_extensions_load(lab_page):
    """JupyterLab serves the widget manager and anywidget's front end, which the panel renders with."""
    lab_page.open()
    extensions = lab_page.lab_extensions()
    assert "anywidget" in extensions
    assert "@jupyter-widgets/jupyterlab-manager" in extensions


def test_lab_runs_a_cell_in_a_real_kernel(lab_page):
    lab_page.new_notebook("arithmetic.ipynb")
    index = lab_page.run_cell("print(6 * 7)")
    assert lab_page.cell_output_text(index).strip() == "42"

"""The chat kernel in a real JupyterLab: picked in the launcher, a cell typed and run is a chat turn."""

from __future__ import annotations

import pytest

# The first turn loads and compiles the default model in the kernel: slow on a busy 2-core machine.
FIRST_TURN_TIMEOUT_MS = 300_000


@pytest.mark.integration
def test_the_launcher_offers_the_chat_kernel_and_each_cell_is_a_turn(lab_page):
    lab_page.open()
    page = lab_page.page
    card = page.locator('.jp-LauncherCard[data-category="Notebook"][title="nbchat"]')
    card.wait_for()
    assert card.locator("img").get_attribute("src").endswith("/kernelspecs/nbchat/logo-64x64.png")
    card.click()
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    lab_page.wait_kernel_idle(timeout_ms=120_000)
    kernel = page.evaluate(
        """() => {
            const widget = window.jupyterapp.shell.currentWidget;
            return {
                name: widget.sessionContext.session.kernel.name,
                language: widget.content.model.getMetadata('language_info').name,
            };
        }"""
    )
    assert kernel == {"name": "nbchat", "language": "markdown"}

    try:
        lab_page.run_cell("%chat set max_tokens=16 temperature=0")
        index = lab_page.run_cell(
            "What is the capital of France? Answer in one short sentence.", timeout_ms=FIRST_TURN_TIMEOUT_MS
        )
        assert "Paris" in lab_page.cell_output_text(index)
        # The reply is the %%chat reply: rendered Markdown, not a Python result.
        assert lab_page.cell(index).locator(".jp-RenderedMarkdown").count() >= 1
        follow_up = lab_page.run_cell("%%python\nprint(6 * 7)")
        assert lab_page.cell_output_text(follow_up).strip() == "42"
    finally:
        # Save, stop the kernel (and its model) and close, so the next test's lab restores nothing.
        page.evaluate(
            """async () => {
                const widget = window.jupyterapp.shell.currentWidget;
                await widget.context.save();
                await widget.sessionContext.shutdown();
                widget.close();
            }"""
        )

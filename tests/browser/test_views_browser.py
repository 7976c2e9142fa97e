"""The teaching views as JupyterLab shows them in Chromium: the --probs tokens and the prompt chips
render as elements with their data and hover text, and their text is readable (WCAG contrast) in
the light and the dark theme."""

from __future__ import annotations

import json

# The contrast of an element's text against what is drawn behind it (the first ancestor with an
# opaque background; a translucent tint is blended over it), by WCAG 2's formula.
CONTRASTS = """(selector) => {
    const parse = (text) => (text.match(/[\\d.]+/g) || []).map(Number);
    const luminance = ([r, g, b]) => {
        const channel = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
    };
    const behind = (element) => {
        const layers = [];
        for (let node = element; node; node = node.parentElement) {
            const [r, g, b, a = 1] = parse(getComputedStyle(node).backgroundColor);
            if (a > 0) layers.push([r, g, b, a]);
            if (a >= 1) break;
        }
        let colour = [255, 255, 255];
        for (const [r, g, b, a] of layers.reverse()) {
            colour = [r, g, b].map((c, i) => c * a + colour[i] * (1 - a));
        }
        return colour;
    };
    return [...document.querySelectorAll(selector)].map((element) => {
        const text = luminance(parse(getComputedStyle(element).color));
        const back = luminance(behind(element));
        return (Math.max(text, back) + 0.05) / (Math.min(text, back) + 0.05);
    });
}"""


def set_theme(lab_page, theme: str) -> None:
    page = lab_page.page
    page.evaluate("(theme) => window.jupyterapp.commands.execute('apputils:change-theme', {theme})", theme)
    light = "true" if theme == "JupyterLab Light" else "false"
    page.wait_for_function("(light) => document.body.dataset.jpThemeLight === light", arg=light)
    page.wait_for_selector("#jupyterlab-splash", state="detached")  # the theme's splash screen is gone


def test_probs_and_prompt_views_render_and_read_in_light_and_dark_themes(
    lab_page, tiny_model_dir, output_dir
):
    lab_page.new_notebook("views.ipynb")
    setup = (
        "%load_ext nbchat\n"
        f"%config ChatMagics.model = {str(tiny_model_dir)!r}\n"
        "%config ChatMagics.temperature = 0.0\n%config ChatMagics.max_tokens = 8"
    )
    lab_page.run_cell(setup)
    index = lab_page.run_cell("%%chat --probs\nHello there", timeout_ms=180_000)
    page = lab_page.page
    tokens = lab_page.cell(index).locator(".nbchat-token")
    usage = page.evaluate(
        """(index) => {
            const cell = window.jupyterapp.shell.currentWidget.content.widgets[index];
            const outputs = cell.model.outputs.toJSON();
            return outputs.find((o) => o.metadata && o.metadata.nbchat).metadata.nbchat;
        }""",
        index,
    )
    stop = usage["finish_reason"] == "stop"
    assert tokens.count() == usage["usage"]["completion_tokens"] - stop
    first = tokens.first
    assert first.get_attribute("title").startswith("p = ")
    assert len(json.loads(first.get_attribute("data-top"))) == 5
    assert first.bounding_box()["width"] > 0  # drawn, not stripped by the output sanitizer

    prompt_index = lab_page.run_cell("%chat prompt --tokens")
    chips = lab_page.cell(prompt_index).locator(".nbchat-prompt-token")
    assert chips.count() == usage["usage"]["prompt_tokens"]

    for theme in ("JupyterLab Light", "JupyterLab Dark"):
        set_theme(lab_page, theme)
        page.screenshot(path=str(output_dir / f"{theme.split()[-1].lower()}.png"))
        for selector in (".nbchat-token", ".nbchat-prompt-token", ".nbchat-legend"):
            contrasts = page.evaluate(CONTRASTS, selector)
            assert contrasts and min(contrasts) >= 4.5, (theme, selector, min(contrasts))
    set_theme(lab_page, "JupyterLab Light")

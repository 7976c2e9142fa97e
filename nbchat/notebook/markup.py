"""Model text -> safe HTML for the chat panel: Markdown rendered by markdown-it-py with raw HTML
disabled (a ``<script>`` in a reply is shown as text), code blocks highlighted by Pygments (CSS
classes, coloured by panel.css from the front end's theme variables), links opening in a new tab
with ``rel="noopener"``.

Rendering happens here, on the kernel side, so the panel ships no JavaScript Markdown library (no
build step, nothing to fetch in an offline classroom) and every front end shows the same HTML.
Nothing here knows about widgets, conversations or models.
"""

from __future__ import annotations

import html
from functools import lru_cache
from typing import Any

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_FORMATTER = HtmlFormatter(nowrap=True, classprefix="nbchat-hl-")


def _highlight(code: str, language: str, attributes: str) -> str:
    """A fenced block as ``<pre><code>``: highlighted when Pygments knows the language, else escaped."""
    name = (language or "").strip().split(maxsplit=1)[0] if language else ""
    try:
        body = highlight(code, get_lexer_by_name(name), _FORMATTER) if name else html.escape(code)
    except ClassNotFound:
        body = html.escape(code)
    label = f' data-language="{html.escape(name)}"' if name else ""
    return f'<pre class="nbchat-code"{label}><code>{body}</code></pre>\n'


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight})
    parser.enable("table").enable("strikethrough")

    def link_open(renderer: Any, tokens: list[Any], index: int, options: Any, env: Any) -> str:
        tokens[index].attrSet("target", "_blank")
        tokens[index].attrSet("rel", "noopener noreferrer")
        return renderer.renderToken(tokens, index, options, env)

    parser.add_render_rule("link_open", link_open)
    return parser


def markdown_html(text: str) -> str:
    """``text`` (Markdown written by a model or a user) as HTML that carries no markup of its own."""
    return _parser().render(text)


def code_html(text: str, language: str = "") -> str:
    """``text`` as one highlighted code block (a tool's arguments or result)."""
    return _highlight(text, language, "")

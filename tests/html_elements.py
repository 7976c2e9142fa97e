"""Elements of an HTML output, as a browser's DOM would have them: tag, attributes and text content.

The teaching views' tests read their data-* contracts through this, from real displays and from
executed notebooks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"br", "img", "hr", "input", "meta", "link", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    @property
    def text(self) -> str:
        """textContent: every text inside, in order."""
        return "".join(child if isinstance(child, str) else child.text for child in self.children)

    def find_all(self, class_name: str) -> list[Element]:
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if class_name in child.classes:
                    found.append(child)
                found += child.find_all(class_name)
        return found

    def number(self, name: str) -> float:
        """A data-* attribute holding a JSON number (``-Infinity`` included)."""
        value = json.loads(self.attrs[name], parse_constant=lambda constant: -math.inf)
        return float(value)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {key: value or "" for key, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(markup: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root

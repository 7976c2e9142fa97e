"""Teaching views: a reply's tokens shaded by probability, the prompt's tokens by message, next-token
bar charts (raw and after the sampling knobs), step mode and side-by-side comparisons.

Each view is a MIME bundle: HTML with inline styles (no script, no stylesheet: it renders the same in
JupyterLab, classic Notebook, VS Code and a static HTML export) and a plain-text form. The HTML has
data-* attributes that tests and the lab extension read:

- reply tokens: one ``span.nbchat-token`` per generated token with ``data-token-id``, ``data-logprob``
  and ``data-top`` (a JSON list of ``[token_text, logprob]``, most likely first); the tokens of one
  character split over several tokens sit in one ``span.nbchat-char`` and the last of them holds it;
- prompt tokens: one ``span.nbchat-prompt-token`` per prompt token with ``data-token-id``,
  ``data-message`` (index, or ``generation``), ``data-part`` and ``data-special``;
- next-token charts: one ``div.nbchat-chart`` per setting (``data-settings`` JSON), one
  ``div.nbchat-next-token`` per token with ``data-token-id``, ``data-logprob`` (the model's) and
  ``data-sampled-logprob`` (after the knobs; ``-Infinity`` when ruled out);
- compare: one ``div.nbchat-compare-column`` per run with ``data-settings``, ``data-completion-tokens``
  and ``data-mean-logprob``.

Colours: probabilities use viridis (perceptually uniform, readable with colour-vision deficiencies),
each chip with its own text colour so light and dark themes both read; the number is on hover.
Nothing here loads a model or imports JAX: the magic hands over plain data from ``nbchat.Engine``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Bundle = dict[str, str]


def show(bundle: Bundle, metadata: dict[str, Any] | None = None) -> None:
    """Display a view's bundle (HTML and plain text) with its output metadata."""
    from IPython.display import display

    display(bundle, raw=True, metadata=metadata or {})


# Viridis at 11 evenly spaced points (matplotlib's table), from probability 0 to 1.
VIRIDIS = (
    "#440154",
    "#482475",
    "#414487",
    "#355f8d",
    "#2a788e",
    "#21918c",
    "#22a884",
    "#44bf70",
    "#7ad151",
    "#bddf26",
    "#fde725",
)
# Okabe-Ito: a palette told apart with every common colour-vision deficiency (prompt messages).
MESSAGE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
GENERATION_COLOUR = "#999999"
# Next-token bars: grey for the model's probability, viridis' middle (visible on light and dark
# backgrounds alike) for the probability after the sampling settings.
MODEL_COLOUR, SAMPLED_COLOUR = "#8c8c8c", "#21918c"
_FONT = "font-family: var(--jp-code-font-family, ui-monospace, SFMono-Regular, Menlo, monospace);"
_CHIP = "border-radius: 3px; padding: 0 1px; margin: 0 0 2px 0; line-height: 1.7;"


@dataclass(frozen=True)
class ReplyToken:
    """One generated token: its id, the text it completes ('' inside a split character), its
    log-probability and the alternatives ``[(token_text, logprob), ...]``, most likely first."""

    token_id: int | None
    text: str
    logprob: float
    top: list[tuple[str, float]]


def probability_colours(probability: float) -> tuple[str, str]:
    """``(background, text colour)`` of a probability on the viridis scale."""
    position = min(max(probability, 0.0), 1.0) * (len(VIRIDIS) - 1)
    background = VIRIDIS[round(position)]
    return background, "#000000" if position >= 5 else "#ffffff"


def _attribute(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), quote=True)


def _json_number(value: float) -> str:
    """A float as JSON would read it (``-Infinity`` for a ruled-out token)."""
    return json.dumps(float(value))


def _visible(text: str) -> str:
    """Token text for a chip: escaped, whitespace kept (the container is pre-wrap)."""
    return html.escape(text, quote=False)


def _percent(logprob: float) -> str:
    probability = math.exp(logprob) if logprob > -math.inf else 0.0
    return f"{probability:.1%}" if probability >= 0.001 or probability == 0 else f"{probability:.2e}"


def legend() -> str:
    """The probability scale: a gradient from 0 to 1 with ticks."""
    gradient = ", ".join(VIRIDIS)
    ticks = "".join(
        f'<span style="position: absolute; left: {value * 100:.0f}%; transform: translateX(-50%);">'
        f"{value:g}</span>"
        for value in (0, 0.25, 0.5, 0.75, 1)
    )
    return (
        '<div class="nbchat-legend" style="margin: 6px 0 2px 0; font-size: 0.85em; max-width: 320px;">'
        "token probability (hover a token for the number and the alternatives)"
        '<div style="height: 10px; border-radius: 2px; '
        f'background: linear-gradient(to right, {gradient});"></div>'
        f'<div style="position: relative; height: 1.2em; margin: 0 6px;">{ticks}</div></div>'
    )


# --- 1. a reply's tokens --------------------------------------------------------------------------


def _token_title(token: ReplyToken) -> str:
    lines = [f"p = {_percent(token.logprob)} (logprob {token.logprob:.3f})"]
    if token.token_id is not None:
        lines[0] += f" · id {token.token_id}"
    if token.top:
        lines.append("alternatives:")
        lines += [f"  {json.dumps(text, ensure_ascii=False)}  {_percent(lp)}" for text, lp in token.top]
    return "\n".join(lines)


def _reply_token_span(token: ReplyToken) -> str:
    background, colour = probability_colours(math.exp(token.logprob))
    # Whitespace stays as it is (the text is the reply's, byte for byte); a dotted outline shows a
    # space token, and a newline token gets some width so its chip shows at the end of its line.
    whitespace = bool(token.text) and not token.text.strip()
    outline = "outline: 1px dotted currentColor;" if whitespace else ""
    width = "padding-left: 0.6em;" if "\n" in token.text and whitespace else ""
    attributes = (
        f'class="nbchat-token" data-token-id="{"" if token.token_id is None else token.token_id}" '
        f'data-logprob="{_json_number(token.logprob)}" '
        f'data-top="{_attribute([[text, lp] for text, lp in token.top])}" '
        f'title="{_attribute(_token_title(token))}"'
    )
    style = f"background: {background}; color: {colour}; {_CHIP} {outline} {width}"
    return f'<span {attributes} style="{style}">{_visible(token.text)}</span>'


def reply_tokens_html(tokens: Sequence[ReplyToken], *, note: str = "") -> str:
    """The reply as its tokens, each shaded by its probability; a character whose bytes span
    several tokens is one ``nbchat-char`` group (the tokens before the last hold no text)."""
    parts, group = [], []
    for token in tokens:
        group.append(_reply_token_span(token))
        if token.text or token is tokens[-1]:
            if len(group) == 1 and token.text:
                parts.append(group[0])
            else:
                # The tokens of one character, or the first bytes of one the reply ended inside.
                title = (
                    f"one character, {len(group)} tokens"
                    if token.text
                    else (f"an unfinished character: the reply ended after {len(group)} of its bytes' tokens")
                )
                parts.append(
                    f'<span class="nbchat-char" title="{title}" '
                    f'style="outline: 1px solid currentColor; border-radius: 3px;">{"".join(group)}</span>'
                )
            group = []
    count = len(tokens)
    mean = sum(token.logprob for token in tokens) / count if count else 0.0
    summary = f"{count} token{'' if count == 1 else 's'} · mean logprob {mean:.3f}"
    if note:
        summary += f" · {html.escape(note)}"
    return (
        f'<div class="nbchat-probs" style="{_FONT}">'
        f'<div style="white-space: pre-wrap; word-break: break-word;">{"".join(parts)}</div>'
        f'<div style="font-size: 0.85em; opacity: 0.8; margin-top: 4px;">{summary}</div>'
        f"{legend()}</div>"
    )


def reply_tokens_text(tokens: Sequence[ReplyToken]) -> str:
    """Plain text: one line per token with its probability."""
    return "\n".join(
        f"{json.dumps(token.text, ensure_ascii=False):<16} {_percent(token.logprob):>7}  id {token.token_id}"
        for token in tokens
    )


def reply_tokens(
    content: Sequence[Any], token_ids: Sequence[int | None], texts: Sequence[str]
) -> list[ReplyToken]:
    """ReplyTokens from a reply's logprobs (OpenAI ``TokenLogprob``s or their dicts), with each
    token's id and the text it completes (``Engine.token_pieces``)."""
    tokens = []
    for item, token_id, text in zip(content, token_ids, texts, strict=True):
        data = item if isinstance(item, Mapping) else item.model_dump()
        top = sorted(((alt["token"], alt["logprob"]) for alt in data["top_logprobs"]), key=lambda a: -a[1])
        tokens.append(ReplyToken(token_id, text, data["logprob"], top))
    return tokens


# --- 2. the prompt's tokens -----------------------------------------------------------------------


def prompt_tokens_html(prompt: Any, roles: Sequence[str]) -> str:
    """The templated prompt as token chips coloured by the message they came from (``Engine.
    prompt_tokens``), special tokens outlined, ids on hover, and the count against the context."""
    chips = []
    for token in prompt.tokens:
        if token.message is None:
            colour, owner = GENERATION_COLOUR, "generation prompt"
        else:
            colour = MESSAGE_COLOURS[token.message % len(MESSAGE_COLOURS)]
            owner = f"message {token.message} ({roles[token.message]})"
        special = token.special
        content = token.part == "content"
        border = f"2px dashed {colour}" if special else f"1px {'solid' if content else 'dotted'} {colour}"
        weight = "font-weight: bold;" if special else ""
        # A tinted background (the colour at ~20% over the theme's own) keeps the theme's text colour.
        background = f"{colour}40" if content else "transparent"
        title = f"id {token.token_id} · {owner} · {token.part}" + (" · special token" if special else "")
        chips.append(
            f'<span class="nbchat-prompt-token" data-token-id="{token.token_id}" '
            f'data-message="{"generation" if token.message is None else token.message}" '
            f'data-part="{token.part}" data-special="{str(special).lower()}" '
            f'title="{_attribute(title)}" '
            f'style="border: {border}; background: {background}; {weight} {_CHIP}">'
            f"{_visible(token.text)}</span>"
        )
    count, context = len(prompt.tokens), prompt.context_length
    keys = "".join(
        f'<span style="border-left: 10px solid {MESSAGE_COLOURS[index % len(MESSAGE_COLOURS)]}; '
        f'padding: 0 8px 0 4px;">{index} {html.escape(role)}</span>'
        for index, role in enumerate(roles)
    )
    keys += (
        f'<span style="border-left: 10px solid {GENERATION_COLOUR}; padding: 0 8px 0 4px;">'
        "generation prompt</span>"
        '<span style="padding: 0 4px; border: 2px dashed currentColor;">special token</span>'
    )
    return (
        f'<div class="nbchat-prompt" style="{_FONT}">'
        f'<div style="font-size: 0.9em; margin-bottom: 4px;">{count} tokens of {context} in the context '
        f"({count / context:.1%}); tinted, solid outline: the messages' own text; dotted outline: what the "
        "template wrote</div>"
        f'<div style="white-space: pre-wrap; word-break: break-word;">{"".join(chips)}</div>'
        f'<div style="font-size: 0.85em; margin-top: 6px;">{keys}</div></div>'
    )


def prompt_tokens_text(prompt: Any) -> str:
    return "".join(f"[{token.text}]" for token in prompt.tokens) + (
        f"\n[{len(prompt.tokens)} tokens of {prompt.context_length}]"
    )


# --- 3. next-token distributions ------------------------------------------------------------------


def _settings_label(settings: Mapping[str, Any]) -> str:
    shown = [f"temperature={settings['temperature']:g}"]
    if settings.get("top_p", 1.0) < 1.0:
        shown.append(f"top_p={settings['top_p']:g}")
    if settings.get("top_k", 0):
        shown.append(f"top_k={settings['top_k']}")
    if settings.get("min_p", 0.0) > 0.0:
        shown.append(f"min_p={settings['min_p']:g}")
    return ", ".join(shown)


def _bar(logprob: float, colour: str, label: str) -> str:
    width = math.exp(logprob) * 100 if logprob > -math.inf else 0.0
    return (
        f'<div title="{_attribute(label)}" '
        'style="display: flex; align-items: center; gap: 4px; height: 9px; margin: 1px 0;">'
        f'<div style="width: 140px; height: 8px; background: rgba(127,127,127,0.15);">'
        f'<div style="width: {width:.1f}%; height: 8px; background: {colour};"></div></div>'
        f'<span style="font-size: 0.8em;">{_percent(logprob)}</span></div>'
    )


def distribution_html(distribution: Any, *, title: str = "", picks: bool = False) -> str:
    """One bar chart per setting, side by side: for each of the most likely next tokens, the
    model's probability (grey) and the probability after that setting's temperature / top_k /
    top_p / min_p (teal); the token the seed draws is marked ▶. ``picks`` numbers the rows for
    ``%chat step --pick N``."""
    charts = []
    for sampled in distribution.sampled:
        rows = []
        for rank, (token, after) in enumerate(zip(distribution.top, sampled.logprobs, strict=True), start=1):
            chosen = token.token_id == sampled.chosen.token_id
            number = f"{rank}. " if picks else ""
            rows.append(
                f'<div class="nbchat-next-token" data-token-id="{token.token_id}" '
                f'data-logprob="{_json_number(token.logprob)}" data-sampled-logprob="{_json_number(after)}" '
                f'style="display: flex; gap: 6px; align-items: center; margin: 2px 0;">'
                f'<span style="width: 1em;">{"▶" if chosen else ""}</span>'
                f'<span style="width: 9em; overflow: hidden; white-space: pre;" title="id {token.token_id}">'
                f"{number}{_visible(json.dumps(token.text, ensure_ascii=False))}</span>"
                f"<div>{_bar(token.logprob, MODEL_COLOUR, 'the model (temperature 1, nothing filtered)')}"
                f"{_bar(after, SAMPLED_COLOUR, 'after ' + _settings_label(sampled.settings))}</div></div>"
            )
        settings = dict(sampled.settings)
        charts.append(
            f'<div class="nbchat-chart" data-settings="{_attribute(settings)}" '
            f'data-chosen-token-id="{sampled.chosen.token_id}" style="padding: 4px 8px; '
            f'border: 1px solid rgba(127,127,127,0.4); border-radius: 4px;">'
            '<div style="font-weight: bold; margin-bottom: 4px;">'
            f"{html.escape(_settings_label(settings))}</div>"
            f'<div style="font-size: 0.8em; margin-bottom: 4px;">{sampled.kept} token'
            f"{'' if sampled.kept == 1 else 's'} may be drawn · ▶ drawn: "
            f"{_visible(json.dumps(sampled.chosen.text, ensure_ascii=False))}</div>{''.join(rows)}</div>"
        )
    heading = html.escape(title) + " · " if title else ""
    return (
        f'<div class="nbchat-next" style="{_FONT}">'
        f'<div style="font-size: 0.9em; margin-bottom: 4px;">{heading}next token after '
        f"{distribution.prompt_tokens} prompt tokens · entropy {distribution.entropy:.2f} nats · grey: the "
        "model's probability; teal: after the sampling settings</div>"
        f'<div style="display: flex; flex-wrap: wrap; gap: 8px;">{"".join(charts)}</div>{legend()}</div>'
    )


def distribution_text(distribution: Any, *, picks: bool = False) -> str:
    lines = []
    for sampled in distribution.sampled:
        plural = "" if sampled.kept == 1 else "s"
        lines.append(f"{_settings_label(sampled.settings)} ({sampled.kept} token{plural} may be drawn)")
        for rank, (token, after) in enumerate(zip(distribution.top, sampled.logprobs, strict=True), start=1):
            mark = ">" if token.token_id == sampled.chosen.token_id else " "
            number = f"{rank:>2}. " if picks else ""
            lines.append(
                f"{mark} {number}{json.dumps(token.text, ensure_ascii=False):<14} "
                f"model {_percent(token.logprob):>7}  sampled {_percent(after):>7}"
            )
    return "\n".join(lines)


# --- 5. compare -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareColumn:
    """One run of a compared turn: the setting that varies, the reply, its tokens and mean logprob."""

    settings: dict[str, Any]
    text: str
    completion_tokens: int
    mean_logprob: float | None
    kept: bool

    @property
    def label(self) -> str:
        """The varied settings as ``key=value, ...``."""
        return ", ".join(f"{key}={value}" for key, value in self.settings.items())

    @property
    def mean_text(self) -> str:
        return "n/a" if self.mean_logprob is None else f"{self.mean_logprob:.3f}"


def compare_html(columns: Sequence[CompareColumn]) -> str:
    cells = []
    for number, column in enumerate(columns, start=1):
        label, mean = column.label, column.mean_text
        kept = " · kept in the conversation" if column.kept else ""
        cells.append(
            f'<div class="nbchat-compare-column" data-settings="{_attribute(column.settings)}" '
            f'data-completion-tokens="{column.completion_tokens}" '
            f'data-mean-logprob="{"" if column.mean_logprob is None else _json_number(column.mean_logprob)}" '
            f'style="flex: 1 1 0; min-width: 200px; padding: 6px 8px; border: '
            f'{"2px" if column.kept else "1px"} solid rgba(127,127,127,0.5); border-radius: 4px;">'
            f'<div style="font-weight: bold;">{number}. {html.escape(label)}</div>'
            f'<div style="font-size: 0.8em; opacity: 0.8;">{column.completion_tokens} tokens · mean logprob '
            f"{mean}{kept}</div>"
            f'<div class="nbchat-compare-text" style="white-space: pre-wrap; margin-top: 6px;">'
            f"{html.escape(column.text)}</div></div>"
        )
    style = "display: flex; gap: 8px; align-items: stretch;"
    return f'<div class="nbchat-compare" style="{style}">{"".join(cells)}</div>'


def compare_text(columns: Sequence[CompareColumn]) -> str:
    blocks = []
    for number, column in enumerate(columns, start=1):
        label, mean = column.label, column.mean_text
        kept = " [kept]" if column.kept else ""
        blocks.append(
            f"{number}. {label} ({column.completion_tokens} tokens, mean logprob {mean}){kept}\n{column.text}"
        )
    return "\n\n".join(blocks)

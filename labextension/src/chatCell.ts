/**
 * Highlighting of `%%chat` cells in CodeMirror 6: the magic and its options line, role headers and
 * `{variable}` interpolations, following the grammar of nbchat/notebook/cells.py (headers at line
 * start, `user:` or `## user`; none inside fenced code; `{{`/`}}` are literal braces). The spans
 * are computed by a pure function; the view plugin only turns them into mark decorations.
 */

import { Extension, RangeSetBuilder } from '@codemirror/state';
import { Decoration, DecorationSet, EditorView, ViewPlugin, ViewUpdate } from '@codemirror/view';

export type ChatSpanKind = 'magic' | 'options' | 'role' | 'variable';

export interface IChatSpan {
  from: number;
  to: number;
  kind: ChatSpanKind;
}

/** The CSS class a span kind is drawn with (the browser tests look for these). */
export const SPAN_CLASSES: Record<ChatSpanKind, string> = {
  magic: 'cm-nbchat-magic',
  options: 'cm-nbchat-options',
  role: 'cm-nbchat-role',
  variable: 'cm-nbchat-variable'
};

const ROLES = 'system|user|assistant';
const COLON_HEADER = new RegExp(`^(?:${ROLES}):`);
const HEADING_HEADER = new RegExp(`^#{1,6}[ \\t]+(?:${ROLES})[ \\t]*:?[ \\t]*$`, 'i');
const FENCE = /^[ \t]{0,3}(`{3,}|~{3,})/;
const PLACEHOLDER = /\{\{|\}\}|\{(?:In|Out)\[-?\d+\]\}|\{[A-Za-z_][A-Za-z_0-9]*\}/g;
const MAGIC = '%%chat';

/** Whether a cell's text is a `%%chat` cell (its first line starts with the magic). */
export function isChatCell(text: string): boolean {
  return text.startsWith(MAGIC) && (text.length === MAGIC.length || /\s/.test(text[MAGIC.length]));
}

/** The highlighted spans of a cell's text, in document order; none unless it is a chat cell. */
export function chatCellSpans(text: string): IChatSpan[] {
  if (!isChatCell(text)) {
    return [];
  }
  const spans: IChatSpan[] = [{ from: 0, to: MAGIC.length, kind: 'magic' }];
  const lines = text.split('\n');
  const firstLine = lines[0];
  const optionsStart = MAGIC.length + (firstLine.slice(MAGIC.length).length - firstLine.slice(MAGIC.length).trimStart().length);
  const optionsEnd = firstLine.trimEnd().length;
  if (optionsEnd > optionsStart) {
    spans.push({ from: optionsStart, to: optionsEnd, kind: 'options' });
  }
  let offset = firstLine.length + 1;
  let fence: string | null = null;
  for (const line of lines.slice(1)) {
    const fenceMatch = FENCE.exec(line);
    if (fenceMatch) {
      const marker = fenceMatch[1];
      if (fence === null) {
        fence = marker;
      } else if (marker[0] === fence[0] && marker.length >= fence.length) {
        fence = null;
      }
    } else if (fence === null) {
      const colon = COLON_HEADER.exec(line);
      if (colon) {
        spans.push({ from: offset, to: offset + colon[0].length, kind: 'role' });
      } else if (HEADING_HEADER.test(line)) {
        spans.push({ from: offset, to: offset + line.trimEnd().length, kind: 'role' });
      }
    }
    for (const match of line.matchAll(PLACEHOLDER)) {
      if (match[0] !== '{{' && match[0] !== '}}') {
        const from = offset + (match.index ?? 0);
        spans.push({ from, to: from + match[0].length, kind: 'variable' });
      }
    }
    offset += line.length + 1;
  }
  return spans.sort((a, b) => a.from - b.from);
}

const MARKS: Record<ChatSpanKind, Decoration> = {
  magic: Decoration.mark({ class: SPAN_CLASSES.magic }),
  options: Decoration.mark({ class: SPAN_CLASSES.options }),
  role: Decoration.mark({ class: SPAN_CLASSES.role }),
  variable: Decoration.mark({ class: SPAN_CLASSES.variable })
};

function decorations(view: EditorView): DecorationSet {
  const builder = new RangeSetBuilder<Decoration>();
  for (const span of chatCellSpans(view.state.doc.toString())) {
    builder.add(span.from, span.to, MARKS[span.kind]);
  }
  return builder.finish();
}

/** The CodeMirror extension: recomputes the spans when the document changes (cells are short). */
export function chatCellHighlighting(): Extension {
  return ViewPlugin.fromClass(
    class {
      decorations: DecorationSet;
      constructor(view: EditorView) {
        this.decorations = decorations(view);
      }
      update(update: ViewUpdate): void {
        if (update.docChanged) {
          this.decorations = decorations(update.view);
        }
      }
    },
    { decorations: plugin => plugin.decorations }
  );
}

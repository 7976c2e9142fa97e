/**
 * What "Send cell to chat" and "Explain this error" take from a notebook cell: its source and the
 * text of its outputs (streams, text/plain of results and displays, an error's traceback). Pure
 * functions on the cell's nbformat JSON, and the Python that hands them to the kernel's docked panel;
 * nothing here talks to a kernel or draws anything.
 */

/** The kernel's panel docked in the sidebar (nbchat.notebook.panel.docked_panel), as Python. */
export const DOCKED = "__import__('nbchat.notebook.panel', fromlist=['docked_panel']).docked_panel()";

/** The parts of nbformat's output JSON read here. */
export interface IOutputJSON {
  output_type: string;
  text?: string | string[];
  data?: Record<string, unknown>;
  traceback?: string[];
  ename?: string;
  evalue?: string;
}

export interface ICellForChat {
  /** The chip's label: "In [3]" for a cell that ran, else "Cell 3" (its position). */
  label: string;
  source: string;
  /** The text of the outputs that are not errors, in order ("" when none). */
  output: string;
  /** The first error output's traceback (terminal colour codes kept: the kernel drops them), or null. */
  traceback: string | null;
}

const joined = (text: string | string[] | unknown): string =>
  Array.isArray(text) ? text.join('') : typeof text === 'string' ? text : '';

export function cellForChat(
  source: string,
  outputs: IOutputJSON[],
  executionCount: number | null,
  index: number
): ICellForChat {
  const texts: string[] = [];
  let traceback: string | null = null;
  for (const output of outputs) {
    if (output.output_type === 'stream') {
      texts.push(joined(output.text));
    } else if (output.output_type === 'error') {
      traceback ??= (output.traceback ?? []).join('\n') || `${output.ename}: ${output.evalue}`;
    } else if (output.data && 'text/plain' in output.data) {
      texts.push(joined(output.data['text/plain']));
    }
  }
  return {
    label: executionCount ? `In [${executionCount}]` : `Cell ${index + 1}`,
    source,
    output: texts.map(text => text.replace(/\n$/, '')).join('\n'),
    traceback
  };
}

/** A Python string literal holding `text` (a JSON string is one). */
export const pythonString = (text: string): string => JSON.stringify(text);

/** The Python that attaches a cell's parts to the docked panel (and, to explain an error, sends). */
export function attachCode(cell: ICellForChat, explainError: boolean): string {
  const attach = (label: string, text: string, language: string): string =>
    `_nbchat_panel.attach_text(${pythonString(label)}, ${pythonString(text)}, ${pythonString(language)})`;
  const lines = [`_nbchat_panel = ${DOCKED}`];
  if (cell.source.trim()) {
    lines.push(attach(cell.label, cell.source, 'python'));
  }
  if (explainError && cell.traceback !== null) {
    lines.push(attach(`${cell.label} error`, cell.traceback, ''));
    lines.push("_nbchat_panel.send('Explain this error.', wait=False)");
  } else if (cell.output.trim()) {
    lines.push(attach(`${cell.label} output`, cell.output, 'text'));
  }
  lines.push('del _nbchat_panel');
  return lines.join('\n');
}

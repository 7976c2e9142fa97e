/**
 * What the code-block buttons do to the notebook that holds a reply: find the chat cell whose
 * output holds a DOM node, then insert a code cell below it, replace the next code cell's source,
 * or insert and run. Nothing here renders anything.
 */

import { Clipboard } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';

import { ICodeActions } from './codeToolbar';

interface ICellLocation {
  panel: NotebookPanel;
  index: number;
}

/** The notebook and the index of the cell whose node contains `node`, or null (e.g. an output view). */
export function locateCell(tracker: INotebookTracker, node: HTMLElement): ICellLocation | null {
  const panel = tracker.find(candidate => candidate.node.contains(node));
  if (!panel) {
    return null;
  }
  const index = panel.content.widgets.findIndex(cell => cell.node.contains(node));
  return index < 0 ? null : { panel, index };
}

function insertCodeCell({ panel, index }: ICellLocation, code: string): number {
  const notebook = panel.content;
  notebook.model!.sharedModel.insertCell(index + 1, { cell_type: 'code', source: code, metadata: {} });
  notebook.activeCellIndex = index + 1;
  notebook.deselectAll();
  return index + 1;
}

/** The actions of the code blocks rendered in `node` (looked up at click time: cells move). */
export function notebookCodeActions(tracker: INotebookTracker, node: HTMLElement): ICodeActions {
  const locate = (): ICellLocation => {
    const location = locateCell(tracker, node);
    if (!location) {
      throw new Error('this reply is not in a notebook cell');
    }
    return location;
  };
  return {
    copy: code => Clipboard.copyToSystem(code),
    insertBelow: code => {
      insertCodeCell(locate(), code);
    },
    replaceNext: code => {
      const location = locate();
      const cells = location.panel.content.widgets;
      const next = cells.findIndex((cell, index) => index > location.index && cell.model.type === 'code');
      if (next < 0) {
        insertCodeCell(location, code);
        return;
      }
      cells[next].model.sharedModel.setSource(code);
      location.panel.content.activeCellIndex = next;
    },
    runBelow: async code => {
      const location = locate();
      insertCodeCell(location, code);
      await NotebookActions.run(location.panel.content, location.panel.sessionContext);
    }
  };
}

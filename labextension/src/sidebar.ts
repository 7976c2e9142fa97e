/**
 * The chat panel docked in the right sidebar: an OutputArea (with the notebook's rendermime, where
 * the widget manager of that notebook's kernel draws widget views) fed by a request in the
 * notebook's kernel that displays the kernel's docked panel (`nbchat.notebook.panel.docked_panel`).
 * "Send cell to chat" and "Explain this error" call that same panel's Python API in the kernel.
 * The panel's own front end (panel.js, anywidget) does all the drawing.
 */

import { NotebookPanel } from '@jupyterlab/notebook';
import { OutputArea, OutputAreaModel } from '@jupyterlab/outputarea';
import { LabIcon } from '@jupyterlab/ui-components';
import { Panel } from '@lumino/widgets';

import { DOCKED } from './cellText';

const SHOW_CODE = `__import__('IPython.display', fromlist=['display']).display(${DOCKED})`;

export const chatIcon = new LabIcon({
  name: 'nbchat:chat',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24"><path class="jp-icon3" ' +
    'fill="#616161" d="M4 3h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z"/></svg>'
});

export class ChatSidebar extends Panel {
  private _notebook: NotebookPanel | null = null;
  private _area: OutputArea | null = null;

  constructor() {
    super();
    this.id = 'nbchat-chat-sidebar';
    this.addClass('jp-nbchat-sidebar');
    this.title.icon = chatIcon;
    this.title.caption = 'nbchat: chat panel';
    this.title.label = 'Chat';
  }

  /** The notebook whose kernel's panel is shown, or null. */
  get notebook(): NotebookPanel | null {
    return this._notebook;
  }

  /** Show the docked panel of `notebook`'s kernel (a request in that kernel, outside its history). */
  async showPanelOf(notebook: NotebookPanel): Promise<void> {
    if (this._notebook === notebook && this._area && this._area.model.length > 0) {
      return;
    }
    this._area?.dispose();
    // Trusted: the output is our own request's (a widget view is an "unsafe" renderer).
    const area = new OutputArea({ model: new OutputAreaModel({ trusted: true }), rendermime: notebook.content.rendermime });
    this._area = area;
    this._notebook = notebook;
    this.title.caption = `nbchat: the chat panel of ${notebook.context.path}'s kernel`;
    this.addWidget(area);
    notebook.disposed.connect(() => {
      if (this._notebook === notebook) {
        area.dispose();
        this._notebook = this._area = null;
      }
    });
    await notebook.sessionContext.ready;
    const kernel = notebook.sessionContext.session?.kernel;
    if (!kernel) {
      throw new Error('nbchat: the notebook has no kernel to chat with');
    }
    area.future = kernel.requestExecute({ code: SHOW_CODE, silent: false, store_history: false });
    await area.future.done;
  }

  /** Run `code` quietly in the shown notebook's kernel; a Python error is thrown as an Error. */
  async runInKernel(code: string): Promise<void> {
    const kernel = this._notebook?.sessionContext.session?.kernel;
    if (!kernel) {
      throw new Error('nbchat: open the chat panel of a notebook with a kernel first');
    }
    const reply = await kernel.requestExecute({ code, silent: true, store_history: false }).done;
    if (reply.content.status === 'error') {
      throw new Error(`nbchat: ${reply.content.ename}: ${reply.content.evalue}`);
    }
  }
}

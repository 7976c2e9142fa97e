/**
 * nbchat's JupyterLab plugins, one per feature: the reply renderer, the highlighting of `%%chat`
 * cells, the "New chat cell" command (palette, notebook toolbar, shortcut), and the chat panel docked
 * in the right sidebar with "Send cell to chat" / "Explain this error". Their settings are
 * the `nbchat:plugin` schema (schema/plugin.json).
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton } from '@jupyterlab/apputils';
import { EditorExtensionRegistry, IEditorExtensionRegistry } from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { attachCode, cellForChat, IOutputJSON } from './cellText';
import { chatCellHighlighting } from './chatCell';
import { notebookCodeActions } from './notebookActions';
import { replyRendererFactory } from './renderer';
import { chatIcon, ChatSidebar } from './sidebar';

export const SETTINGS_ID = 'nbchat:plugin';
export const NEW_CHAT_CELL = 'nbchat:new-chat-cell';
export const OPEN_CHAT_PANEL = 'nbchat:open-chat-panel';
export const SEND_CELL = 'nbchat:send-cell-to-chat';
export const EXPLAIN_ERROR = 'nbchat:explain-error';

/** The settings, read once at start and kept current as the user changes them. */
class Settings {
  codeToolbar = true;
  notebookToolbarButton = true;
  readonly changed: Array<() => void> = [];

  async follow(registry: ISettingRegistry | null): Promise<void> {
    if (!registry) {
      return;
    }
    const settings = await registry.load(SETTINGS_ID);
    const read = (): void => {
      this.codeToolbar = settings.get('codeToolbar').composite as boolean;
      this.notebookToolbarButton = settings.get('notebookToolbarButton').composite as boolean;
      this.changed.forEach(listener => listener());
    };
    read();
    settings.changed.connect(read);
  }
}

const settings = new Settings();

const commandsPlugin: JupyterFrontEndPlugin<void> = {
  id: SETTINGS_ID,
  description: 'The "New chat cell" command: palette, notebook toolbar button and shortcut.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ISettingRegistry],
  activate: async (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    registry: ISettingRegistry | null
  ) => {
    app.commands.addCommand(NEW_CHAT_CELL, {
      label: 'New chat cell',
      caption: 'Insert a %%chat cell below the active cell',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        const panel = tracker.currentWidget;
        if (!panel?.content.model) {
          return;
        }
        const notebook = panel.content;
        const index = notebook.activeCellIndex + 1;
        notebook.model!.sharedModel.insertCell(index, { cell_type: 'code', source: '%%chat\n', metadata: {} });
        notebook.activeCellIndex = index;
        notebook.deselectAll();
        // Ready to type the message: the new cell's editor has the focus, after the magic line.
        const cell = notebook.activeCell;
        await cell?.ready; // a new cell's editor holds its text once the cell is ready
        notebook.activate();
        notebook.mode = 'edit';
        cell?.editor?.focus();
        cell?.editor?.setCursorPosition({ line: 1, column: 0 });
      }
    });
    palette?.addItem({ command: NEW_CHAT_CELL, category: 'nbchat' });

    const buttons = new Map<NotebookPanel, ToolbarButton>();
    const showButton = (panel: NotebookPanel): void => {
      const existing = buttons.get(panel);
      if (settings.notebookToolbarButton && !existing) {
        const button = new ToolbarButton({
          className: 'jp-nbchat-newChatCell',
          label: '%%chat',
          tooltip: 'New chat cell',
          onClick: () => void app.commands.execute(NEW_CHAT_CELL)
        });
        panel.toolbar.insertAfter('cellType', 'nbchat-new-chat-cell', button) ||
          panel.toolbar.addItem('nbchat-new-chat-cell', button);
        buttons.set(panel, button);
        panel.disposed.connect(() => buttons.delete(panel));
      } else if (!settings.notebookToolbarButton && existing) {
        existing.dispose();
        buttons.delete(panel);
      }
    };
    tracker.widgetAdded.connect((_, panel) => showButton(panel));
    settings.changed.push(() => tracker.forEach(showButton));
    await settings.follow(registry);
    tracker.forEach(showButton);
  }
};

const rendererPlugin: JupyterFrontEndPlugin<void> = {
  id: 'nbchat:reply-renderer',
  description: 'Draws chat replies with code-block actions and finish-state badges.',
  autoStart: true,
  requires: [IRenderMimeRegistry, INotebookTracker],
  activate: (_: JupyterFrontEnd, rendermime: IRenderMimeRegistry, tracker: INotebookTracker) => {
    const factory = replyRendererFactory({
      codeActions: node => notebookCodeActions(tracker, node),
      codeToolbar: () => settings.codeToolbar
    });
    rendermime.addFactory(factory, factory.defaultRank);
  }
};

const highlightingPlugin: JupyterFrontEndPlugin<void> = {
  id: 'nbchat:chat-cell-highlighting',
  description: 'Highlights role headers, {variables} and the options line of %%chat cells.',
  autoStart: true,
  requires: [IEditorExtensionRegistry],
  activate: (_: JupyterFrontEnd, extensions: IEditorExtensionRegistry) => {
    extensions.addExtension({
      name: 'nbchat:chat-cell',
      factory: () => EditorExtensionRegistry.createImmutableExtension(chatCellHighlighting())
    });
  }
};

const sidebarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'nbchat:chat-sidebar',
  description: 'The chat panel of the notebook\'s kernel in the right sidebar; cells and errors sent to it.',
  autoStart: true,
  requires: [INotebookTracker, ILabShell],
  optional: [ICommandPalette],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker, shell: ILabShell, palette: ICommandPalette | null) => {
    const sidebar = new ChatSidebar();
    const open = async (): Promise<ChatSidebar> => {
      const notebook = tracker.currentWidget;
      if (!notebook) {
        throw new Error('nbchat: open a notebook first');
      }
      if (!sidebar.isAttached) {
        shell.add(sidebar, 'right', { rank: 50 });
      }
      shell.activateById(sidebar.id);
      await sidebar.showPanelOf(notebook);
      return sidebar;
    };
    const activeCell = () => {
      const notebook = tracker.currentWidget;
      const cell = notebook?.content.activeCell;
      if (!notebook || !cell) {
        return null;
      }
      const json = cell.model.toJSON() as { outputs?: IOutputJSON[]; execution_count?: number | null };
      const index = notebook.content.widgets.indexOf(cell);
      return cellForChat(cell.model.sharedModel.getSource(), json.outputs ?? [], json.execution_count ?? null, index);
    };
    const sendCell = async (explainError: boolean): Promise<void> => {
      const cell = activeCell();
      if (!cell) {
        return;
      }
      await (await open()).runInKernel(attachCode(cell, explainError));
    };

    app.commands.addCommand(OPEN_CHAT_PANEL, {
      label: 'Open chat panel',
      caption: "Show the chat panel of this notebook's kernel in the right sidebar",
      icon: chatIcon,
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        await open();
      }
    });
    app.commands.addCommand(SEND_CELL, {
      label: 'Send cell to chat',
      caption: "Attach the cell's source and output to the chat panel's next message",
      icon: chatIcon,
      isEnabled: () => activeCell() !== null,
      execute: () => sendCell(false)
    });
    app.commands.addCommand(EXPLAIN_ERROR, {
      label: 'Explain this error',
      caption: 'Send the cell and its traceback to the chat panel',
      isEnabled: () => activeCell()?.traceback != null,
      isVisible: () => activeCell()?.traceback != null,
      execute: () => sendCell(true)
    });
    for (const command of [OPEN_CHAT_PANEL, SEND_CELL, EXPLAIN_ERROR]) {
      palette?.addItem({ command, category: 'nbchat' });
    }
    app.contextMenu.addItem({ command: SEND_CELL, selector: '.jp-Notebook .jp-Cell', rank: 20 });
    app.contextMenu.addItem({ command: EXPLAIN_ERROR, selector: '.jp-Notebook .jp-CodeCell', rank: 21 });
    tracker.widgetAdded.connect((_, panel) => {
      const button = new ToolbarButton({
        className: 'jp-nbchat-openChatPanel',
        icon: chatIcon,
        tooltip: 'Open chat panel',
        onClick: () => void app.commands.execute(OPEN_CHAT_PANEL)
      });
      panel.toolbar.addItem('nbchat-open-chat-panel', button);
    });
  }
};

export default [rendererPlugin, highlightingPlugin, commandsPlugin, sidebarPlugin];

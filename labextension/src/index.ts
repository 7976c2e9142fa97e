/**
 * nbchat's JupyterLab plugins, one per feature: the reply renderer, the highlighting of `%%chat`
 * cells, and the "New chat cell" command (palette, notebook toolbar, shortcut). Their settings are
 * the `nbchat:plugin` schema (schema/plugin.json).
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton } from '@jupyterlab/apputils';
import { EditorExtensionRegistry, IEditorExtensionRegistry } from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { chatCellHighlighting } from './chatCell';
import { notebookCodeActions } from './notebookActions';
import { replyRendererFactory } from './renderer';

export const SETTINGS_ID = 'nbchat:plugin';
export const NEW_CHAT_CELL = 'nbchat:new-chat-cell';

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

export default [rendererPlugin, highlightingPlugin, commandsPlugin];

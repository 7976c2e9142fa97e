/**
 * The small toolbar on each fenced code block of a rendered reply: Copy, Insert below, Replace
 * next cell, Run below. It only finds the blocks, reads their code and calls the actions it is
 * given; what an action does to a notebook lives in notebookActions.ts.
 */

export interface ICodeActions {
  copy(code: string): Promise<void> | void;
  insertBelow(code: string): Promise<void> | void;
  replaceNext(code: string): Promise<void> | void;
  runBelow(code: string): Promise<void> | void;
}

interface IButtonSpec {
  action: keyof ICodeActions;
  label: string;
  ariaLabel: string;
}

export const CODE_BUTTONS: ReadonlyArray<IButtonSpec> = [
  { action: 'copy', label: 'Copy', ariaLabel: 'Copy code' },
  { action: 'insertBelow', label: 'Insert below', ariaLabel: 'Insert code below' },
  { action: 'replaceNext', label: 'Replace', ariaLabel: 'Replace next cell' },
  { action: 'runBelow', label: 'Run below', ariaLabel: 'Run code below' }
];

export const TOOLBAR_CLASS = 'jp-nbchat-codeToolbar';
export const BLOCK_CLASS = 'jp-nbchat-codeBlock';

/**
 * A code block's code as the reply wrote it. Markdown renderers end a fenced block's text with
 * one newline that is not part of the code.
 */
export function codeOfBlock(pre: HTMLElement): string {
  const code = pre.querySelector('code') ?? pre;
  return (code.textContent ?? '').replace(/\n$/, '');
}

/**
 * Put a toolbar on every `<pre>` block under `host` (once per block) wired to `actions`.
 * Returns the number of blocks given a toolbar.
 */
export function addCodeToolbars(host: HTMLElement, actions: ICodeActions): number {
  let added = 0;
  host.querySelectorAll<HTMLElement>('pre').forEach(pre => {
    if (pre.parentElement?.classList.contains(BLOCK_CLASS)) {
      return;
    }
    const block = document.createElement('div');
    block.className = BLOCK_CLASS;
    pre.replaceWith(block);
    const toolbar = document.createElement('div');
    toolbar.className = TOOLBAR_CLASS;
    toolbar.setAttribute('role', 'toolbar');
    for (const spec of CODE_BUTTONS) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = `jp-nbchat-codeButton jp-nbchat-code-${spec.action}`;
      button.textContent = spec.label;
      button.title = spec.ariaLabel;
      button.setAttribute('aria-label', spec.ariaLabel);
      button.addEventListener('click', event => {
        event.preventDefault();
        event.stopPropagation();
        void Promise.resolve(actions[spec.action](codeOfBlock(pre))).catch(error =>
          console.error(`nbchat: ${spec.ariaLabel} failed`, error)
        );
      });
      toolbar.appendChild(button);
    }
    block.appendChild(toolbar);
    block.appendChild(pre);
    added += 1;
  });
  return added;
}

import { addCodeToolbars, codeOfBlock, ICodeActions, TOOLBAR_CLASS } from '../codeToolbar';

function host(html: string): HTMLElement {
  const element = document.createElement('div');
  element.innerHTML = html;
  return element;
}

function recordingActions(): { actions: ICodeActions; calls: Array<[string, string]> } {
  const calls: Array<[string, string]> = [];
  const record = (name: string) => (code: string) => {
    calls.push([name, code]);
  };
  return {
    calls,
    actions: {
      copy: record('copy'),
      insertBelow: record('insertBelow'),
      replaceNext: record('replaceNext'),
      runBelow: record('runBelow')
    }
  };
}

const TWO_BLOCKS =
  '<p>First:</p><pre><code class="language-python">x = 1 &lt; 2\nprint(x)\n</code></pre>' +
  '<p>Then:</p><pre><code>echo "{a}"\n</code></pre>';

describe('addCodeToolbars', () => {
  it('puts the four buttons, with their aria-labels, on every code block', () => {
    const element = host(TWO_BLOCKS);
    expect(addCodeToolbars(element, recordingActions().actions)).toBe(2);
    const toolbars = element.querySelectorAll(`.${TOOLBAR_CLASS}`);
    expect(toolbars).toHaveLength(2);
    toolbars.forEach(toolbar => {
      const labels = Array.from(toolbar.querySelectorAll('button')).map(button => button.getAttribute('aria-label'));
      expect(labels).toEqual(['Copy code', 'Insert code below', 'Replace next cell', 'Run code below']);
    });
  });

  it('hands each button exactly its block\'s code', () => {
    const element = host(TWO_BLOCKS);
    const { actions, calls } = recordingActions();
    addCodeToolbars(element, actions);
    const [first, second] = Array.from(element.querySelectorAll(`.${TOOLBAR_CLASS}`));
    (first.querySelector('[aria-label="Insert code below"]') as HTMLButtonElement).click();
    (first.querySelector('[aria-label="Run code below"]') as HTMLButtonElement).click();
    (second.querySelector('[aria-label="Copy code"]') as HTMLButtonElement).click();
    (second.querySelector('[aria-label="Replace next cell"]') as HTMLButtonElement).click();
    expect(calls).toEqual([
      ['insertBelow', 'x = 1 < 2\nprint(x)'],
      ['runBelow', 'x = 1 < 2\nprint(x)'],
      ['copy', 'echo "{a}"'],
      ['replaceNext', 'echo "{a}"']
    ]);
  });

  it('adds a toolbar once however often it runs', () => {
    const element = host(TWO_BLOCKS);
    const { actions } = recordingActions();
    addCodeToolbars(element, actions);
    expect(addCodeToolbars(element, actions)).toBe(0);
    expect(element.querySelectorAll(`.${TOOLBAR_CLASS}`)).toHaveLength(2);
  });

  it('leaves a reply without code blocks as it is', () => {
    const element = host('<p>No code here.</p>');
    expect(addCodeToolbars(element, recordingActions().actions)).toBe(0);
    expect(element.innerHTML).toBe('<p>No code here.</p>');
  });
});

describe('codeOfBlock', () => {
  it('keeps blank lines inside the code and drops only the renderer\'s last newline', () => {
    const element = host('<pre><code>a\n\nb\n\n</code></pre>');
    expect(codeOfBlock(element.querySelector('pre') as HTMLElement)).toBe('a\n\nb\n');
  });
});

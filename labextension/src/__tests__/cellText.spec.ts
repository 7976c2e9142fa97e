import { attachCode, cellForChat } from '../cellText';

describe('cellForChat', () => {
  it('reads streams and results as the output, an error as the traceback', () => {
    const cell = cellForChat(
      'print(1)\n1 / 0',
      [
        { output_type: 'stream', text: ['1\n'] },
        { output_type: 'execute_result', data: { 'text/plain': '42', 'text/html': '<b>42</b>' } },
        { output_type: 'error', ename: 'ZeroDivisionError', evalue: 'division by zero', traceback: ['Trace', 'ZeroDivisionError'] }
      ],
      7,
      2
    );
    expect(cell).toEqual({ label: 'In [7]', source: 'print(1)\n1 / 0', output: '1\n42', traceback: 'Trace\nZeroDivisionError' });
  });

  it('labels a cell that never ran by its position', () => {
    expect(cellForChat('x', [], null, 0)).toEqual({ label: 'Cell 1', source: 'x', output: '', traceback: null });
  });
});

describe('attachCode', () => {
  const cell = { label: 'In [3]', source: "s = 'a\"b'\n", output: 'out', traceback: '\u001b[31mKeyError\u001b[0m' };

  it('attaches the source and output as Python string literals', () => {
    expect(attachCode(cell, false).split('\n').slice(1)).toEqual([
      '_nbchat_panel.attach_text("In [3]", "s = \'a\\"b\'\\n", "python")',
      '_nbchat_panel.attach_text("In [3] output", "out", "text")',
      'del _nbchat_panel'
    ]);
  });

  it('sends the traceback with the code to explain an error', () => {
    expect(attachCode(cell, true).split('\n').slice(2)).toEqual([
      '_nbchat_panel.attach_text("In [3] error", "\\u001b[31mKeyError\\u001b[0m", "")',
      "_nbchat_panel.send('Explain this error.', wait=False)",
      'del _nbchat_panel'
    ]);
  });
});

import { chatCellSpans, isChatCell } from '../chatCell';

function spans(text: string): Array<[string, string]> {
  return chatCellSpans(text).map(span => [span.kind, text.slice(span.from, span.to)]);
}

describe('chatCellSpans', () => {
  it('marks the magic, its options, role headers and variables', () => {
    const cell = '%%chat --new -s "be brief"\nsystem: Be kind.\nuser: hi {name}\n## assistant\nhello\nuser: {In[3]}';
    expect(spans(cell)).toEqual([
      ['magic', '%%chat'],
      ['options', '--new -s "be brief"'],
      ['role', 'system:'],
      ['role', 'user:'],
      ['variable', '{name}'],
      ['role', '## assistant'],
      ['role', 'user:'],
      ['variable', '{In[3]}']
    ]);
  });

  it('ignores headers inside fenced code and literal {{braces}}', () => {
    const cell = '%%chat\nExplain:\n```\nuser: not a header\n```\n{{not_a_var}} and {x}';
    expect(spans(cell)).toEqual([
      ['magic', '%%chat'],
      ['variable', '{x}']
    ]);
  });

  it('marks nothing in a cell that is not a chat cell', () => {
    expect(isChatCell('%%chatty\nuser: x')).toBe(false);
    expect(chatCellSpans('x = 1\nuser: {y}')).toEqual([]);
    expect(isChatCell('%%chat')).toBe(true);
  });
});

import { parseReply, ReplyDataError, replyBadges } from '../reply';

const payload = {
  version: 1,
  text: 'Try:\n```python\nprint(1)\n```',
  format: 'markdown',
  markdown: 'Try:\n```python\nprint(1)\n```',
  finish_reason: 'stop',
  interrupted: false,
  model: 'smollm2-135m-instruct',
  usage: { prompt_tokens: 5, completion_tokens: 9, total_tokens: 14 }
};

describe('parseReply', () => {
  it('reads the payload render.py writes', () => {
    const reply = parseReply(payload);
    expect(reply).toEqual({
      text: payload.text,
      format: 'markdown',
      markdown: payload.markdown,
      finishReason: 'stop',
      interrupted: false,
      model: 'smollm2-135m-instruct',
      usage: payload.usage,
      logprobs: null
    });
  });

  it('keeps a text reply as plain text (no Markdown)', () => {
    const reply = parseReply({ ...payload, format: 'text', markdown: null });
    expect(reply.markdown).toBeNull();
    expect(reply.format).toBe('text');
  });

  it('takes the text as the Markdown when the payload has no markdown field', () => {
    const { markdown: _, ...withoutMarkdown } = payload;
    expect(parseReply(withoutMarkdown).markdown).toBe(payload.text);
  });

  it('carries per-token logprobs', () => {
    const logprobs = [{ token: 'Hi', logprob: -0.25, top_logprobs: [{ token: 'Hi', logprob: -0.25 }] }];
    expect(parseReply({ ...payload, logprobs }).logprobs).toEqual(logprobs);
  });

  it.each([
    [null, 'expected a JSON object'],
    [{ ...payload, text: 3 }, '"text" must be a string'],
    [{ ...payload, format: 'html' }, '"format" must be one of markdown, text, code, json, not "html"'],
    [{ ...payload, model: 7 }, '"model" must be a string or null'],
    [{ ...payload, usage: [1] }, '"usage" must be an object or null'],
    [{ ...payload, logprobs: [{ token: 'a' }] }, '"logprobs" must be a list of {token, logprob} entries']
  ])('refuses bad data with the field named (%#)', (data, message) => {
    expect(() => parseReply(data)).toThrow(ReplyDataError);
    expect(() => parseReply(data)).toThrow(message);
  });
});

describe('replyBadges', () => {
  it('shows only the token count for a reply that stopped', () => {
    expect(replyBadges(parseReply(payload)).map(badge => badge.kind)).toEqual(['tokens']);
    expect(replyBadges(parseReply(payload))[0].label).toBe('9 tokens');
  });

  it('marks an interrupted reply', () => {
    const badges = replyBadges(parseReply({ ...payload, interrupted: true, finish_reason: null }));
    expect(badges[0]).toMatchObject({ kind: 'interrupted', label: '⏹ interrupted' });
  });

  it('marks a reply cut off at max tokens', () => {
    const badges = replyBadges(parseReply({ ...payload, finish_reason: 'length' }));
    expect(badges[0]).toMatchObject({ kind: 'length', label: '✂ cut off at max tokens' });
  });

  it('shows no badge without usage or a special ending', () => {
    expect(replyBadges(parseReply({ ...payload, usage: null }))).toEqual([]);
  });
});

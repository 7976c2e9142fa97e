/**
 * The reply data the nbchat magic emits (`application/vnd.nbchat.reply+json`, written by
 * nbchat/notebook/render.py's `reply_payload`), parsed into a typed model, and the finish-state
 * badges it calls for. Nothing here touches the DOM or JupyterLab.
 */

export const REPLY_MIMETYPE = 'application/vnd.nbchat.reply+json';

export type ReplyFormat = 'markdown' | 'text' | 'code' | 'json';
const FORMATS: ReadonlyArray<ReplyFormat> = ['markdown', 'text', 'code', 'json'];

/** One token's entry in OpenAI's `logprobs.content`. */
export interface ITokenLogprob {
  token: string;
  logprob: number;
  top_logprobs?: Array<{ token: string; logprob: number }>;
}

export interface IUsage {
  prompt_tokens?: number;
  completion_tokens?: number;
  total_tokens?: number;
}

export interface IReply {
  text: string;
  format: ReplyFormat;
  /** What the reply is drawn as (Markdown), without the finish-state note; null for plain text. */
  markdown: string | null;
  finishReason: string | null;
  interrupted: boolean;
  model: string | null;
  usage: IUsage | null;
  logprobs: ITokenLogprob[] | null;
}

/** Thrown for data that is not a reply payload; the message names the field. */
export class ReplyDataError extends Error {}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function optionalString(data: Record<string, unknown>, field: string): string | null {
  const value = data[field];
  if (value === undefined || value === null) {
    return null;
  }
  if (typeof value !== 'string') {
    throw new ReplyDataError(`reply data: "${field}" must be a string or null`);
  }
  return value;
}

/** The reply model of a payload; a payload of the wrong shape raises a ReplyDataError. */
export function parseReply(data: unknown): IReply {
  if (!isObject(data)) {
    throw new ReplyDataError('reply data: expected a JSON object');
  }
  if (typeof data.text !== 'string') {
    throw new ReplyDataError('reply data: "text" must be a string');
  }
  const format = data.format === undefined ? 'markdown' : data.format;
  if (!FORMATS.includes(format as ReplyFormat)) {
    throw new ReplyDataError(
      `reply data: "format" must be one of ${FORMATS.join(', ')}, not ${JSON.stringify(format)}`
    );
  }
  let markdown = optionalString(data, 'markdown');
  if (markdown === null && data.markdown === undefined && format !== 'text') {
    markdown = data.text; // a payload without the field: its text is the Markdown
  }
  const usage = data.usage;
  if (usage !== undefined && usage !== null && !isObject(usage)) {
    throw new ReplyDataError('reply data: "usage" must be an object or null');
  }
  const logprobs = data.logprobs;
  if (logprobs !== undefined && logprobs !== null) {
    const valid =
      Array.isArray(logprobs) &&
      logprobs.every(
        entry => isObject(entry) && typeof entry.token === 'string' && typeof entry.logprob === 'number'
      );
    if (!valid) {
      throw new ReplyDataError('reply data: "logprobs" must be a list of {token, logprob} entries');
    }
  }
  return {
    text: data.text,
    format: format as ReplyFormat,
    markdown,
    finishReason: optionalString(data, 'finish_reason'),
    interrupted: data.interrupted === true,
    model: optionalString(data, 'model'),
    usage: (usage as IUsage | undefined) ?? null,
    logprobs: (logprobs as ITokenLogprob[] | undefined) ?? null
  };
}

export interface IBadge {
  /** A CSS modifier and a test hook: "interrupted", "length", "tokens". */
  kind: string;
  label: string;
  title: string;
}

/** The badges under a reply: how it ended (when not a plain stop) and its token count. */
export function replyBadges(reply: IReply): IBadge[] {
  const badges: IBadge[] = [];
  if (reply.interrupted) {
    badges.push({ kind: 'interrupted', label: '⏹ interrupted', title: 'The reply was stopped before it ended.' });
  } else if (reply.finishReason === 'length') {
    badges.push({
      kind: 'length',
      label: '✂ cut off at max tokens',
      title: 'The reply reached max_tokens; raise --max-tokens to let it finish.'
    });
  }
  const tokens = reply.usage?.completion_tokens;
  if (typeof tokens === 'number') {
    const model = reply.model ? ` · ${reply.model}` : '';
    badges.push({ kind: 'tokens', label: `${tokens} tokens`, title: `Completion tokens${model}` });
  }
  return badges;
}

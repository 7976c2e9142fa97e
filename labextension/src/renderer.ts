/**
 * The renderer of `application/vnd.nbchat.reply+json`: the reply's Markdown drawn by JupyterLab's
 * own (sanitizing) Markdown renderer, a toolbar on each code block and the finish-state badges.
 * Data that is not a reply payload is shown as its Markdown with a one-line error.
 */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { renderMarkdown, renderText } from '@jupyterlab/rendermime';
import { Widget } from '@lumino/widgets';

import { addCodeToolbars, ICodeActions } from './codeToolbar';
import { IReply, parseReply, REPLY_MIMETYPE, replyBadges } from './reply';

export interface IReplyRendererOptions {
  /** The actions of the code blocks rendered in `node`. */
  codeActions: (node: HTMLElement) => ICodeActions;
  /** Whether code blocks get their toolbar (a setting). */
  codeToolbar: () => boolean;
}

export class ReplyRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(
    private readonly rendererOptions: IRenderMime.IRendererOptions,
    private readonly options: IReplyRendererOptions
  ) {
    super();
    this.addClass('jp-nbchat-reply');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.node.textContent = '';
    const body = document.createElement('div');
    body.className = 'jp-nbchat-replyBody';
    this.node.appendChild(body);
    let reply: IReply;
    try {
      reply = parseReply(model.data[REPLY_MIMETYPE]);
    } catch (error) {
      const fallback = model.data['text/markdown'];
      await this.draw(body, typeof fallback === 'string' ? fallback : null, String(model.data['text/plain'] ?? ''), model);
      const line = document.createElement('div');
      line.className = 'jp-nbchat-replyError';
      line.textContent = (error as Error).message;
      this.node.appendChild(line);
      return;
    }
    await this.draw(body, reply.markdown, reply.text, model);
    if (this.options.codeToolbar()) {
      addCodeToolbars(body, this.options.codeActions(this.node));
    }
    const badges = replyBadges(reply);
    if (badges.length) {
      const row = document.createElement('div');
      row.className = 'jp-nbchat-badges';
      for (const badge of badges) {
        const span = document.createElement('span');
        span.className = `jp-nbchat-badge jp-nbchat-badge-${badge.kind}`;
        span.textContent = badge.label;
        span.title = badge.title;
        row.appendChild(span);
      }
      this.node.appendChild(row);
    }
  }

  private async draw(
    body: HTMLElement,
    markdown: string | null,
    text: string,
    model: IRenderMime.IMimeModel
  ): Promise<void> {
    const options = this.rendererOptions;
    if (markdown === null) {
      body.classList.add('jp-RenderedText');
      await renderText({ host: body, source: text, sanitizer: options.sanitizer, translator: options.translator });
      return;
    }
    body.classList.add('jp-RenderedHTMLCommon', 'jp-RenderedMarkdown');
    await renderMarkdown({
      host: body,
      source: markdown,
      trusted: model.trusted,
      sanitizer: options.sanitizer,
      resolver: options.resolver,
      linkHandler: options.linkHandler,
      latexTypesetter: options.latexTypesetter,
      markdownParser: options.markdownParser ?? null,
      shouldTypeset: this.isAttached,
      translator: options.translator
    });
  }

  protected onAfterAttach(): void {
    this.rendererOptions.latexTypesetter?.typeset(this.node);
  }
}

/** The factory registered with the rendermime registry (it ranks above every built-in renderer). */
export function replyRendererFactory(options: IReplyRendererOptions): IRenderMime.IRendererFactory {
  return {
    safe: true, // everything drawn goes through the sanitizer
    mimeTypes: [REPLY_MIMETYPE],
    defaultRank: -1, // above the JSON viewer (rank 0) too: a JSON reply keeps its code actions and badges
    createRenderer: rendererOptions => new ReplyRenderer(rendererOptions, options)
  };
}

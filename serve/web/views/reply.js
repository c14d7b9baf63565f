// A reply streamed into the page, for a companion's chat and a group chat alike: its text token
// by token, then the stored reply's bubble in its place.

import { events, explain, streamedError } from '../api.js';
import { h, notice } from '../dom.js';

// Stream `path` into `holder` (a bubble with a .text, already on the page). Resolves to 'done'
// (holder replaced by render(the stored reply)), 'stopped' or 'failed' (onError(err) told; a
// holder with no text yet removed).
export async function streamInto(holder, path, json, { signal, render, onError }) {
  const said = holder.querySelector('.text');
  try {
    await events(path, { method: 'POST', json: { ...json, stream: true }, signal,
      onEvent: (name, data) => {
        if (name === 'delta') {
          said.append(data.content);   // text, token by token
          holder.scrollIntoView({ block: 'end' });
        } else if (name === 'done') {
          holder.replaceWith(render(data.reply));
        } else if (name === 'error') {
          throw streamedError(data.error);
        }
      } });
    return 'done';
  } catch (err) {
    holder.classList.remove('streaming');
    if (err.name === 'AbortError') {
      holder.append(h('span', { class: 'hint' }, '(stopped)'));
      return 'stopped';
    }
    if (!said.textContent) holder.remove();
    onError(err);
    return 'failed';
  }
}

// A reply in a conversation's list: `holder` shown at its end, the Regenerate offers gone, Send
// swapped for Stop while it streams (streamInto's outcome).
export async function replyInto(messages, holder, path, json, { send, stop, signal, render, onError }) {
  messages.append(holder);
  holder.scrollIntoView({ block: 'end' });
  for (const old of messages.querySelectorAll('.regenerate')) old.remove();
  send.hidden = true;
  stop.hidden = false;
  try {
    return await streamInto(holder, path, json, { signal, render, onError });
  } finally {
    send.hidden = false;
    stop.hidden = true;
  }
}

// A reply that failed, said in words at the end of the list, with a Retry.
export function failedLine(messages, err, retry) {
  const line = h('li', { class: 'message error' }, notice(explain(err), 'error', {
    label: 'Retry', run: () => { line.remove(); retry(); } }));
  messages.append(line);
}

// In the composer, Enter sends and Shift+Enter is a new line.
export function enterSends(text, form) {
  text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}

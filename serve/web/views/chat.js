// Chat: the companion's conversations; replies stream token by token with a stop button;
// each reply can unfold the memories and the world entries its prompt used; a conversation that
// outgrew the context shows what the companion keeps in mind from its earlier turns, editable.

import { api, explain } from '../api.js';
import { day, fill, h, when } from '../dom.js';
import { enterSends, failedLine, replyInto } from './reply.js';

export async function chatView(root, { args: [companionId, conversationId] }) {
  const companion = await api(`/companions/${companionId}`);
  const list = h('ul', { class: 'conversations' });
  const messages = h('ol', { class: 'messages', 'aria-live': 'polite' });
  // Disabled until a conversation is open: a message typed before has nowhere to go.
  const text = h('textarea', { id: 'message', rows: 2, placeholder: `Message ${companion.name}…`,
    'aria-label': 'Message', 'data-enter-sends': '', disabled: true });
  const sendButton = h('button', { type: 'submit', id: 'send', disabled: true }, 'Send');
  const stopButton = h('button', { type: 'button', id: 'stop', class: 'danger', hidden: true }, 'Stop');
  const form = h('form', { class: 'composer' }, text, sendButton, stopButton);
  const kept = h('details', { class: 'kept-in-mind', hidden: true });
  let current = null;   // the open conversation
  let replying = null;  // the AbortController of the reply being streamed

  async function loadList() {
    const conversations = await api(`/conversations?companion=${encodeURIComponent(companionId)}&limit=100`);
    // The group chats it is in open in the group view.
    fill(list, conversations.map((c) => h('li', { 'aria-current': c.id === current?.id ? 'true' : null },
      h('a', { href: c.companions ? `#/group/${c.id}` : `#/chat/${companionId}/${c.id}` },
        c.title || `${day(c.created_at)} ${c.companions ? 'group chat' : 'conversation'}`),
      h('span', { class: 'hint' }, c.source === 'imported' ? `imported · ${day(c.updated_at)}` : when(c.updated_at)),
      h('span', { class: 'row-actions' },
        h('button', { type: 'button', class: 'link', onclick: () => rename(c) }, 'Rename'),
        h('button', { type: 'button', class: 'link danger', onclick: () => forget(c) }, 'Delete')))));
    return conversations;
  }

  async function rename(conversation) {
    const title = prompt('A title for this conversation', conversation.title ?? '');
    if (title === null) return;
    await api(`/conversations/${conversation.id}`, { method: 'PATCH', json: { title: title || null } });
    await loadList();
  }

  async function forget(conversation) {
    if (!confirm('Delete this conversation and everything remembered from it?')) return;
    await api(`/conversations/${conversation.id}`, { method: 'DELETE' });
    if (conversation.id === current?.id) location.hash = `#/chat/${companionId}`;
    else await loadList();
  }

  function bubble(message) {
    const item = h('li', { class: `message ${message.role}`, 'data-id': message.id ?? null },
      h('span', { class: 'speaker' }, message.role === 'user' ? 'You' : companion.name),
      h('div', { class: 'text' }, message.content));
    if (message.role === 'assistant') item.append(...details(message));
    return item;
  }

  // Why a memory was recalled, as the API says it (memory/recall.py: Why).
  function because(why) {
    const parts = [`${why.matched} matched (${why.similarity.toFixed(2)})`];
    if (why.window) parts.push(why.window);
    if (why.said_again) parts.push('said again elsewhere, so it counts less in a reply');
    if (why.reranked != null) parts.push(`ordered by the reranker (${why.reranked.toFixed(2)})`);
    return parts.join('; ');
  }

  function details(message) {
    const extra = [];
    if (message.finish_reason === 'length' || message.truncated) extra.push(h('span', { class: 'hint' }, '(cut off)'));
    const used = message.memories_used;
    if (used?.length) {
      const items = h('ul', { class: 'used' });
      const box = h('details', { class: 'memories-used' }, h('summary', {}, `memories used (${used.length})`), items);
      box.addEventListener('toggle', () => {
        if (!box.open || items.childElementCount) return;
        fill(items, used.map((m) => {
          const date = h('span', { class: 'hint' });
          api(`/memories/${m.id}`).then((full) => { date.textContent = day(full.created_at); })
            .catch(() => { date.textContent = 'deleted since'; });
          return h('li', {}, date, ' ', h('a', { href: `#/memory/${companionId}/${m.id}` }, m.text),
            h('span', { class: 'score' }, ` ${m.score.toFixed(2)}`),
            m.why ? h('p', { class: 'why hint' }, because(m.why)) : null);
        }));
      });
      extra.push(box);
    }
    const lore = message.lore_used;
    if (lore?.length) {
      extra.push(h('details', { class: 'memories-used lore-used' }, h('summary', {}, `world entries used (${lore.length})`),
        h('ul', { class: 'used' }, lore.map((e) => h('li', {}, h('a', { href: `#/world/${companionId}` }, e.name),
          h('span', { class: 'hint' }, ` ${e.why}; ${e.where}`))))));
    }
    return extra;
  }

  // The running summary (serve/summaries.py): shown above the conversation, with a line after
  // the last message it covers; saved in the user's own words.
  async function loadSummary() {
    const { summary, folding } = await api(`/conversations/${current.id}/summary`);
    for (const old of messages.querySelectorAll('.folded')) old.remove();
    if (!summary) {
      kept.hidden = true;
      return;
    }
    const words = h('textarea', { id: 'summary-text', rows: 6, 'aria-label': 'Summary' }, summary.text);
    const status = h('span', { class: 'hint', role: 'status' },
      summary.edited ? 'in your words' : 'written by the model', folding ? ' · more is being folded in' : '');
    const save = h('button', { type: 'button', id: 'save-summary' }, 'Save');
    save.addEventListener('click', async () => {
      try {
        await api(`/conversations/${current.id}/summary`, { method: 'PUT', json: { text: words.value } });
        status.textContent = 'saved, in your words';
      } catch (err) {
        status.textContent = explain(err);
      }
    });
    fill(kept, h('summary', {}, `What ${companion.name} keeps in mind from earlier`,
      h('span', { class: 'hint' }, ` (the first ${summary.turns} messages)`)),
    h('p', { class: 'hint' }, `These messages no longer fit in what ${companion.name} reads before a reply; `
      + 'this summary stands in for them.'), words, h('div', { class: 'row-actions' }, save, status));
    kept.hidden = false;
    const last = messages.querySelector(`[data-id="${summary.through_message_id}"]`);
    last?.after(h('li', { class: 'folded hint' }, `Above: kept in mind as a summary`));
  }

  async function open(id) {
    const { conversation, messages: said } = await api(`/conversations/${id}`);
    if (conversation.companions) {   // a group chat: its own view
      location.hash = `#/group/${id}`;
      return;
    }
    current = conversation;
    text.disabled = sendButton.disabled = false;
    fill(messages, said.map(bubble));
    await loadSummary();
    offerRegenerate();
    messages.lastElementChild?.scrollIntoView({ block: 'end' });
  }

  async function start() {
    const { conversation } = await api('/conversations', { method: 'POST', json: { companion: companionId } });
    location.hash = `#/chat/${companionId}/${conversation.id}`;
  }

  // Stream a reply into a new bubble; resolves to 'done' (stored), 'stopped' or 'failed'.
  async function stream(path, json, onError) {
    const reply = h('li', { class: 'message assistant streaming' },
      h('span', { class: 'speaker' }, companion.name), h('div', { class: 'text' }));
    replying = new AbortController();
    const outcome = await replyInto(messages, reply, path, json,
      { send: sendButton, stop: stopButton, signal: replying.signal, render: bubble, onError });
    replying = null;
    offerRegenerate();
    loadList();
    loadSummary();
    return outcome;
  }

  const failed = (err, retry) => failedLine(messages, err, retry);

  function send(content) {
    const mine = bubble({ role: 'user', content });
    messages.append(mine);
    return stream(`/conversations/${current.id}/messages`, { content },
      (err) => failed(err, () => { mine.remove(); send(content); }));
  }

  // The last reply, if it answers your last message, can be made again.
  function offerRegenerate() {
    const last = messages.lastElementChild;
    if (!last?.classList.contains('assistant') || !last.previousElementSibling?.classList.contains('user')
        || last.querySelector('.regenerate')) return;
    const again = async () => {
      last.hidden = true;   // replaced once the new reply is stored; back if it fails or is stopped
      const outcome = await stream(`/conversations/${current.id}/regenerate`, {},
        (err) => failed(err, again));
      if (outcome === 'done') last.remove();
      else last.hidden = false;
      offerRegenerate();
    };
    last.append(h('button', { type: 'button', class: 'link regenerate', onclick: again }, 'Regenerate'));
  }

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const content = text.value.trim();
    if (!content || replying || !current) return;
    text.value = '';
    send(content);
  });
  enterSends(text, form);
  stopButton.addEventListener('click', () => replying?.abort());

  const conversations = await loadList();
  fill(root,
    h('aside', { class: 'sidebar' },
      h('button', { type: 'button', id: 'new-conversation', onclick: start }, 'New conversation'), list),
    h('div', { class: 'chat' }, h('h1', {}, companion.name), kept, messages, form));
  const chosen = conversationId ?? conversations.find((c) => !c.companions)?.id;
  if (chosen) {
    await open(chosen);
    await loadList();
    text.focus();
  } else {
    await start();
  }
  return () => replying?.abort();
}

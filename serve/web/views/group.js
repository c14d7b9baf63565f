// Group chats: several companions in one conversation. Start one from your companions with a
// reply order; each reply shows its speaker's picture and name; ask a given companion to answer
// next, choose who answers your message, or have the last reply said again (by whom you pick).

import { api, explain } from '../api.js';
import { day, fill, h, notice, when } from '../dom.js';
import { enterSends, failedLine, replyInto } from './reply.js';

const ORDERS = [['natural', 'Natural', 'whoever your message names answers; else whoever has been quiet longest'],
  ['round_robin', 'Round robin', 'each answers in turn'], ['manual', 'Manual', 'you choose who answers each time']];

export async function groupView(root, { me, args: [conversationId] }) {
  const companions = await api('/companions');
  const byId = new Map(companions.map((c) => [c.id, c]));
  const pictures = new Map();   // id -> object URL, revoked when the view is left
  const list = h('ul', { class: 'conversations' });
  const messages = h('ol', { class: 'messages', 'aria-live': 'polite' });
  const text = h('textarea', { id: 'message', rows: 2, placeholder: 'Message the group…', 'aria-label': 'Message',
    disabled: true });
  const answerer = h('select', { id: 'answerer', 'aria-label': 'Who answers' });
  const sendButton = h('button', { type: 'submit', id: 'send', disabled: true }, 'Send');
  const stopButton = h('button', { type: 'button', id: 'stop', class: 'danger', hidden: true }, 'Stop');
  const form = h('form', { class: 'composer' }, text, answerer, sendButton, stopButton);
  const askRow = h('div', { class: 'ask-next row-actions' });
  const heading = h('div', { class: 'group-heading' });
  let current = null;   // the open group chat
  let replying = null;  // the AbortController of the reply being streamed

  function avatar(id) {
    const companion = byId.get(id);
    const name = companion?.name ?? id ?? '?';
    const box = h('span', { class: 'avatar small', 'aria-hidden': 'true' }, name.slice(0, 1).toUpperCase());
    if (!companion?.has_picture) return box;
    if (!pictures.has(id)) {
      pictures.set(id, api(`/companions/${id}/picture`).then((blob) => URL.createObjectURL(blob)).catch(() => null));
    }
    pictures.get(id).then((url) => { if (url) fill(box, h('img', { src: url, alt: '' })); });
    return box;
  }

  function nameOf(id) { return byId.get(id)?.name ?? id ?? 'Someone'; }

  function bubble(message) {
    const mine = message.role === 'user';
    return h('li', { class: `message ${message.role}`, 'data-id': message.id ?? null,
      'data-speaker': message.speaker ?? null },
    h('span', { class: 'speaker' }, mine ? null : avatar(message.speaker), mine ? 'You' : nameOf(message.speaker)),
    h('div', { class: 'text' }, message.content),
    message.truncated || message.finish_reason === 'length' ? h('span', { class: 'hint' }, '(cut off)') : null);
  }

  async function loadList() {
    const all = await api('/conversations?limit=200');
    const groups = all.filter((c) => c.companions);
    fill(list, groups.map((c) => h('li', { 'aria-current': c.id === current?.id ? 'true' : null },
      h('a', { href: `#/group/${c.id}` }, c.title || c.companions.map(nameOf).join(', ')),
      h('span', { class: 'hint' }, when(c.updated_at)))));
    if (!groups.length) fill(list, h('li', { class: 'hint' }, 'No group chats yet.'));
    return groups;
  }

  function starter() {
    const boxes = companions.map((c) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', name: 'member', value: c.id }), avatar(c.id), c.name));
    const order = h('select', { name: 'reply_order', 'aria-label': 'Reply order' },
      ORDERS.map(([value, label]) => h('option', { value }, label)));
    const explained = h('p', { class: 'hint' }, ORDERS[0][2]);
    order.addEventListener('change', () => { explained.textContent = ORDERS.find(([v]) => v === order.value)[2]; });
    const problem = h('div');
    const form = h('form', { onsubmit: async (e) => {
      e.preventDefault();
      const chosen = boxes.map((b) => b.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
      if (chosen.length < 2) return fill(problem, notice('Choose at least two companions.', 'error'));
      try {
        const { conversation } = await api('/conversations', { method: 'POST',
          json: { companions: chosen, reply_order: order.value } });
        location.hash = `#/group/${conversation.id}`;
      } catch (err) {
        fill(problem, notice(explain(err), 'error'));
      }
    } }, boxes, h('label', {}, 'Who answers', order), explained,
    h('button', { type: 'submit', id: 'start-group' }, 'Start'), problem);
    // Folded away while a group chat is open (on a phone it would stand above it).
    return h('details', { class: 'card new-group', open: !conversationId && !groups.length },
      h('summary', {}, h('h2', {}, 'New group chat')), form);
  }

  async function open(id) {
    const { conversation, messages: said } = await api(`/conversations/${id}`);
    if (!conversation.companions) {   // one companion's: its own chat view
      location.hash = `#/chat/${conversation.companion_id}/${id}`;
      return;
    }
    current = conversation;
    const order = ORDERS.find(([value]) => value === conversation.reply_order)?.[1] ?? '';
    fill(heading, h('h1', {}, conversation.title || 'Group chat'),
      h('p', { class: 'members' }, conversation.companions.map((c) => h('span', { class: 'member' }, avatar(c), nameOf(c))),
        h('span', { class: 'hint' }, ` · ${order} order · since ${day(conversation.created_at)}`)));
    fill(answerer, conversation.reply_order === 'manual' ? null : h('option', { value: '' }, `${order} order`),
      conversation.companions.map((c) => h('option', { value: c }, nameOf(c))));
    fill(askRow, h('span', { class: 'hint' }, 'Ask to answer next:'), conversation.companions.map((c) =>
      h('button', { type: 'button', class: 'quiet ask', 'data-speaker': c, onclick: () => ask(c) }, nameOf(c))));
    text.disabled = sendButton.disabled = false;
    fill(messages, said.map(bubble));
    offerRegenerate();
    messages.lastElementChild?.scrollIntoView({ block: 'end' });
  }

  async function stream(path, json, speaker, onError) {
    const reply = h('li', { class: 'message assistant streaming', 'data-speaker': speaker },
      h('span', { class: 'speaker' }, speaker ? [avatar(speaker), nameOf(speaker)] : '…'), h('div', { class: 'text' }));
    replying = new AbortController();
    const outcome = await replyInto(messages, reply, path, json,
      { send: sendButton, stop: stopButton, signal: replying.signal, render: bubble, onError });
    replying = null;
    offerRegenerate();
    loadList();
    return outcome;
  }

  const failed = (err, retry) => failedLine(messages, err, retry);

  function send(content, speaker) {
    const mine = bubble({ role: 'user', content });
    messages.append(mine);
    return stream(`/conversations/${current.id}/messages`, { content, ...(speaker ? { speaker } : {}) }, speaker,
      (err) => { mine.remove(); failed(err, () => send(content, speaker)); });
  }

  function ask(speaker) {
    if (replying || !current) return;
    stream(`/conversations/${current.id}/messages`, { speaker }, speaker, (err) => failed(err, () => ask(speaker)));
  }

  // The last reply, after your first message, can be said again: by the same companion or another.
  function offerRegenerate() {
    const last = messages.lastElementChild;
    if (!last?.classList.contains('assistant') || !messages.querySelector('.message.user')
        || last.querySelector('.regenerate')) return;
    const by = h('select', { class: 'regenerate-by', 'aria-label': 'Said again by' },
      current.companions.map((c) => h('option', { value: c, selected: c === last.dataset.speaker }, nameOf(c))));
    const again = async () => {
      const speaker = by.value;
      last.hidden = true;   // replaced once the new reply is stored; back if it fails or is stopped
      const outcome = await stream(`/conversations/${current.id}/regenerate`, { speaker }, speaker,
        (err) => failed(err, again));
      if (outcome === 'done') last.remove();
      else last.hidden = false;
      offerRegenerate();
    };
    last.append(h('span', { class: 'regenerate row-actions' },
      h('button', { type: 'button', class: 'link', onclick: again }, 'Regenerate'), h('span', { class: 'hint' }, 'as'), by));
  }

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const content = text.value.trim();
    if (!content || replying || !current) return;
    text.value = '';
    send(content, answerer.value || null);
  });
  enterSends(text, form);
  stopButton.addEventListener('click', () => replying?.abort());

  const groups = await loadList();
  const chosen = conversationId ?? groups[0]?.id;
  fill(root,
    h('aside', { class: 'sidebar' }, starter(), list),
    h('div', { class: 'chat' }, heading, messages, askRow, form));
  if (chosen) {
    await open(chosen);
    await loadList();
    text.focus();
  } else {
    fill(heading, h('h1', {}, 'Group chats'), h('p', { class: 'hint' },
      companions.length < 2 ? 'A group chat needs two companions or more: create another first.'
        : `Choose companions to talk with together, ${me.display_name || me.name}.`));
  }
  return () => {
    replying?.abort();
    for (const url of pictures.values()) url.then((u) => u && URL.revokeObjectURL(u));
  };
}

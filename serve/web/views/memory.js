// Memory: what the companion remembers of you. Search, filter, add a fact, edit, pin,
// delete; forget a whole conversation.

import { api, explain } from '../api.js';
import { day, fill, h, notice } from '../dom.js';

const FILTERS = [['', 'Everything'], ['fact', 'Facts'], ['pinned', 'Pinned'], ['exchange', 'Exchanges']];

export async function memoryView(root, { args: [companionId, focusId] }) {
  const companion = await api(`/companions/${companionId}`);
  const status = h('div', { class: 'status' });
  const list = h('ul', { class: 'memories' });
  const query = h('input', { type: 'search', name: 'q', placeholder: 'Search what it remembers…', 'aria-label': 'Search' });
  const filter = h('select', { name: 'filter', 'aria-label': 'Show' },
    FILTERS.map(([value, label]) => h('option', { value }, label)));
  const fact = h('textarea', { name: 'fact', rows: 2, required: true, maxlength: 4000,
    placeholder: 'Something it should always know, e.g. "I am allergic to walnuts."', 'aria-label': 'New fact' });
  const pin = h('input', { type: 'checkbox', name: 'pinned' });

  async function load() {
    const q = query.value.trim();
    let found;
    if (q) {
      found = (await api(`/companions/${companionId}/memories/search?k=50&q=${encodeURIComponent(q)}`));
    } else {
      const kind = ['fact', 'exchange'].includes(filter.value) ? `&kind=${filter.value}` : '';
      found = await api(`/companions/${companionId}/memories?limit=500${kind}`);
    }
    if (filter.value === 'pinned') found = found.filter((m) => m.pinned);
    else if (q && filter.value) found = found.filter((m) => m.kind === filter.value);
    fill(list, found.length ? found.map(item) : h('li', { class: 'hint' }, q ? 'Nothing matches.' : 'Nothing remembered yet.'));
    const focused = focusId && list.querySelector(`[data-id="${CSS.escape(focusId)}"]`);
    focused?.classList.add('focus');
    focused?.scrollIntoView({ block: 'center' });
  }

  function item(memory) {
    const text = h('p', { class: 'text' }, memory.text);
    const row = h('li', { class: `memory ${memory.kind}${memory.pinned ? ' pinned' : ''}`, 'data-id': memory.id },
      h('div', { class: 'meta' },
        h('span', { class: 'kind' }, memory.kind === 'fact' ? 'fact' : 'from a conversation'),
        memory.pinned ? h('span', { class: 'badge' }, 'pinned') : null,
        h('time', {}, day(memory.created_at)),
        memory.score != null ? h('span', { class: 'score' }, `match ${memory.score.toFixed(2)}`) : null,
        memory.conversation_id ? h('a', { href: `#/chat/${companionId}/${memory.conversation_id}`, class: 'hint' },
          'conversation') : null),
      text,
      h('div', { class: 'row-actions' },
        h('button', { type: 'button', class: 'link', onclick: () => edit(memory, row, text) }, 'Edit'),
        h('button', { type: 'button', class: 'link', onclick: () => change(memory, { pinned: !memory.pinned }) },
          memory.pinned ? 'Unpin' : 'Pin'),
        h('button', { type: 'button', class: 'link danger', onclick: () => remove(memory) }, 'Delete'),
        memory.conversation_id ? h('button', { type: 'button', class: 'link danger',
          onclick: () => forgetConversation(memory.conversation_id) }, 'Forget its conversation') : null));
    return row;
  }

  function edit(memory, row, text) {
    const box = h('textarea', { rows: 3, value: memory.text, maxlength: 4000, 'aria-label': 'Memory text' });
    const form = h('form', { class: 'inline', onsubmit: (e) => { e.preventDefault(); change(memory, { text: box.value }); } },
      box, h('button', { type: 'submit' }, 'Save'),
      h('button', { type: 'button', class: 'quiet', onclick: () => form.replaceWith(text) }, 'Cancel'));
    text.replaceWith(form);
    box.focus();
  }

  async function act(work, done) {
    try {
      await work();
      fill(status, notice(done, 'ok'));
      await load();
    } catch (err) {
      fill(status, notice(explain(err), 'error'));
    }
  }

  const change = (memory, edit) => act(() => api(`/memories/${memory.id}`, { method: 'PATCH', json: edit }),
    edit.text !== undefined ? 'Saved; it is searched by its new words from now on.' : edit.pinned ? 'Pinned.' : 'Unpinned.');
  const remove = (memory) => confirm('Delete this memory? It will never be recalled again.')
    && act(() => api(`/memories/${memory.id}`, { method: 'DELETE' }), 'Deleted.');
  const forgetConversation = (id) => confirm('Forget that whole conversation: its messages and everything remembered from it?')
    && act(() => api(`/conversations/${id}`, { method: 'DELETE' }), 'The conversation is forgotten.');

  const addForm = h('form', { class: 'card form add-fact', onsubmit: (e) => {
    e.preventDefault();
    act(async () => {
      await api(`/companions/${companionId}/memories`, { method: 'POST', json: { text: fact.value.trim(), pinned: pin.checked } });
      fact.value = '';
      pin.checked = false;
    }, 'Added; it ranks first whenever it is relevant.');
  } }, h('h2', {}, 'Add a fact'), fact, h('label', { class: 'check' }, pin, ' Pinned: in every prompt'),
  h('button', { type: 'submit' }, 'Add'));

  let typing;
  query.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(load, 250); });
  filter.addEventListener('change', load);
  fill(root, h('h1', {}, `What ${companion.name} remembers`), addForm,
    h('div', { class: 'toolbar' }, query, filter), status, list);
  await load();
}

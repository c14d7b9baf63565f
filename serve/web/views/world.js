// World: the companion's lorebook. Entries go into the prompt when the recent messages name one of
// their keys. Add, edit, switch on and off, delete; test a message to see which entries it sets off.
// A card's own fields that this page does not show (SillyTavern's extensions, decorators) are kept.

import { api, explain } from '../api.js';
import { fill, h, notice } from '../dom.js';

const words = (text) => text.split(',').map((w) => w.trim()).filter(Boolean);

export async function worldView(root, { args: [companionId] }) {
  let card = await api(`/companions/${companionId}`);
  const status = h('div', { class: 'status' });
  const list = h('ul', { class: 'entries' });
  const editor = h('div');
  const probe = h('textarea', { name: 'probe', rows: 2, maxlength: 20000, 'aria-label': 'A message to test',
    placeholder: 'A message, e.g. "What is the forest called?"' });
  const fired = h('div', { class: 'fired', 'aria-live': 'polite' });
  const book = () => card.character_book ?? { name: card.name, entries: [] };

  function show() {
    const entries = book().entries;
    fill(list, entries.length ? entries.map(item)
      : h('li', { class: 'hint' }, `${card.name} knows nothing of the world yet: add an entry.`));
  }

  function item(entry, index) {
    const label = entry.name || entry.comment || entry.keys[0] || `entry ${index + 1}`;
    const enabled = h('input', { type: 'checkbox', checked: entry.enabled !== false, 'aria-label': `Use ${label}`,
      onchange: () => change(`${label} is ${enabled.checked ? 'on' : 'off'}.`, (all) => {
        all[index] = { ...all[index], enabled: enabled.checked };
      }) });
    return h('li', { class: `entry${entry.enabled === false ? ' off' : ''}`, 'data-index': index },
      h('div', { class: 'meta' }, h('label', { class: 'check' }, enabled, h('strong', {}, label)),
        entry.constant ? h('span', { class: 'badge' }, 'always') : null,
        h('span', { class: 'keys' }, entry.keys.join(', ')),
        h('span', { class: 'hint' }, entry.position === 'after_char' ? 'after the description'
          : entry.position === 'before_char' ? 'before the description' : '')),
      h('p', { class: 'text' }, entry.content),
      h('div', { class: 'row-actions' },
        h('button', { type: 'button', class: 'link', onclick: () => edit(index) }, 'Edit'),
        h('button', { type: 'button', class: 'link danger', onclick: () => confirm(`Delete ${label}?`)
          && change(`${label} is deleted.`, (all) => { all.splice(index, 1); }) }, 'Delete')));
  }

  // Save the card with its entries changed by alter(entries); the card's other fields are kept.
  async function change(done, alter) {
    const next = structuredClone(book());
    alter(next.entries);
    try {
      card = await api(`/companions/${companionId}`, { method: 'PUT', json: { ...card, character_book: next } });
      fill(editor);
      fill(status, notice(done, 'ok'));
    } catch (err) {
      fill(status, notice(explain(err), 'error'));
    }
    show();
  }

  function edit(index) {
    const entry = index == null ? null : book().entries[index];
    const keys = h('input', { name: 'keys', required: !entry?.constant, value: (entry?.keys ?? []).join(', '),
      placeholder: 'Eldoria, the forest' });
    const content = h('textarea', { name: 'content', rows: 4, required: true, value: entry?.content ?? '' });
    const secondary = h('input', { name: 'secondary', value: (entry?.secondary_keys ?? []).join(', ') });
    const constant = h('input', { type: 'checkbox', name: 'constant', checked: !!entry?.constant });
    const position = h('select', { name: 'position' },
      [['before_char', 'Before the description'], ['after_char', 'After the description']].map(([value, text]) =>
        h('option', { value, selected: (entry?.position ?? 'after_char') === value }, text)));
    const order = h('input', { type: 'number', name: 'order', value: entry?.insertion_order ?? 100, step: 1 });
    const form = h('form', { class: 'card form', onsubmit: (e) => {
      e.preventDefault();
      const fields = { keys: words(keys.value), content: content.value, constant: constant.checked,
        secondary_keys: words(secondary.value), selective: words(secondary.value).length > 0,
        position: position.value, insertion_order: Number(order.value) || 0 };
      const name = fields.keys[0] || 'the entry';
      change(index == null ? `${name} is added.` : `${name} is saved.`, (all) => {
        if (index == null) {
          const ids = all.map((x) => Number(x.id)).filter(Number.isFinite);
          all.push({ id: ids.length ? Math.max(...ids) + 1 : 0, extensions: {}, enabled: true, ...fields });
        } else {
          all[index] = { ...all[index], ...fields };
        }
      });
    } },
    h('h2', {}, entry ? 'Edit the entry' : 'New entry'),
    h('label', {}, 'Keys: words that bring it up (commas between; /like this/i for a pattern)', keys),
    h('label', {}, 'What the companion knows', content),
    h('label', {}, 'Only with one of these too (optional)', secondary),
    h('div', { class: 'row' }, h('label', {}, 'Where', position), h('label', {}, 'Order (lower first)', order)),
    h('label', { class: 'check' }, constant, ' Always: in every prompt, keys or not'),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save'),
      h('button', { type: 'button', class: 'quiet', onclick: () => fill(editor) }, 'Cancel')));
    fill(editor, form);
    keys.focus();
  }

  async function test(e) {
    e.preventDefault();
    try {
      const result = await api(`/companions/${companionId}/lorebook/test`,
        { method: 'POST', json: { text: probe.value } });
      fill(fired, result.fired.length
        ? h('ol', { class: 'used' }, result.fired.map((f) => h('li', { 'data-entry': f.entry },
          h('strong', {}, f.name), ` (${f.why}; ${f.where}): `, h('span', { class: 'hint' }, f.text))))
        : h('p', { class: 'hint' }, 'No entry fires for this message.'),
      result.unsupported.length ? h('p', { class: 'hint' },
        `Kept in the card, not acted on: ${result.unsupported.join('; ')}`) : null);
    } catch (err) {
      fill(fired, notice(explain(err), 'error'));
    }
  }

  fill(root,
    h('div', { class: 'heading' }, h('h1', {}, `What ${card.name} knows of the world`),
      h('button', { type: 'button', onclick: () => edit(null) }, 'New entry')),
    h('p', { class: 'hint' }, `Each entry goes into the prompt when the ${book().scan_depth ?? 2} newest messages`
      + ' name one of its keys.'),
    h('form', { class: 'card form test', onsubmit: test }, h('h2', {}, 'Test a message'), probe,
      h('button', { type: 'submit' }, 'Which entries fire?'), fired),
    status, editor, list);
  show();
}

// Companions: cards with picture and name; create, edit, import a Character Card or a bundle,
// take a companion away as a card or a bundle, delete.

import { api, explain } from '../api.js';
import { download, dropZone, fill, h, notice } from '../dom.js';

const FIELDS = [
  ['name', 'Name', 'input'], ['description', 'Who they are', 'textarea'],
  ['personality', 'Personality', 'textarea'], ['scenario', 'Scenario', 'textarea'],
  ['first_mes', 'Greeting', 'textarea'], ['system_prompt', 'System prompt (replaces the default)', 'textarea'],
];

export async function companionsView(root, { me }) {
  const status = h('div', { class: 'status' });
  const grid = h('ul', { class: 'cards' });
  const editor = h('div');

  async function load() {
    const companions = await api('/companions');
    fill(grid, companions.map((c) => card(c)));
    if (!companions.length) fill(grid, h('li', { class: 'hint' }, 'No companions yet: create one or import a card.'));
  }

  function card(companion) {
    const picture = h('div', { class: 'avatar', 'aria-hidden': 'true' }, companion.name.slice(0, 1).toUpperCase());
    if (companion.has_picture) {   // else the initial stays, and nothing is asked for
      api(`/companions/${companion.id}/picture`).then((blob) => {
        const url = URL.createObjectURL(blob);
        fill(picture, h('img', { src: url, alt: '', onload: () => URL.revokeObjectURL(url) }));
      }).catch(() => { /* gone meanwhile: the initial stays */ });
    }
    return h('li', { class: 'card companion', 'data-id': companion.id },
      picture,
      h('h2', {}, companion.name), h('p', { class: 'hint' }, companion.id),
      h('p', { class: 'about' }, (companion.description || companion.personality)
        .replace(/\{\{char\}\}/gi, companion.name).replace(/\{\{user\}\}/gi, me.display_name || 'User')),
      h('div', { class: 'actions' },
        h('a', { class: 'button', href: `#/chat/${companion.id}` }, 'Talk'),
        h('a', { href: `#/memory/${companion.id}` }, 'Memory'),
        h('a', { href: `#/world/${companion.id}` }, 'World'),
        h('a', { href: `#/voice/${companion.id}` }, 'Voice'),
        h('button', { type: 'button', class: 'quiet', onclick: () => edit(companion) }, 'Edit'),
        h('button', { type: 'button', class: 'quiet', title: 'A Character Card (PNG) for other front ends',
          onclick: () => save(companion, 'card') }, 'Card'),
        h('button', { type: 'button', class: 'quiet',
          title: 'Everything: card, your history and memories, voices (.homefire)',
          onclick: () => save(companion, 'bundle') }, 'Bundle'),
        h('button', { type: 'button', class: 'quiet danger', onclick: () => remove(companion) }, 'Delete')));
  }

  function edit(companion) {
    const creating = !companion;
    const inputs = {};
    const id = h('input', { name: 'id', required: true, pattern: '[a-z0-9][a-z0-9_\\-]{0,63}',
      value: companion?.id ?? '', disabled: !creating, title: 'lower-case letters, digits, - and _' });
    const form = h('form', { class: 'card form', onsubmit: async (e) => {
      e.preventDefault();
      const { has_picture: _listed, ...card } = companion ?? {};   // the listing's, not the card's
      const body = { ...card, id: id.value.trim() };
      for (const [name, input] of Object.entries(inputs)) body[name] = input.value;
      try {
        if (creating) await api('/companions', { method: 'POST', json: body });
        else await api(`/companions/${companion.id}`, { method: 'PUT', json: body });
        fill(editor);
        fill(status, notice(`${body.name} is saved.`, 'ok'));
        await load();
      } catch (err) {
        fill(problem, notice(explain(err), 'error'));
      }
    } },
    h('h2', {}, creating ? 'New companion' : `Edit ${companion.name}`),
    h('label', {}, 'Id (the model name clients ask for)', id),
    FIELDS.map(([name, label, tag]) => {
      inputs[name] = h(tag, { name, value: companion?.[name] ?? '', required: name === 'name', rows: 3 });
      return h('label', {}, label, inputs[name]);
    }),
    me.admin ? h('p', { class: 'hint' }, 'As an admin, a companion you create is shared with every user.') : null,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save'),
      h('button', { type: 'button', class: 'quiet', onclick: () => fill(editor) }, 'Cancel')));
    const problem = h('div');
    fill(editor, form, problem);
    form.querySelector(creating ? '[name=id]' : '[name=name]').focus();
  }

  async function remove(companion) {
    if (!confirm(`Delete ${companion.name} with your conversations, memories and voices? This cannot be undone.`)) return;
    try {
      await api(`/companions/${companion.id}`, { method: 'DELETE' });
      fill(status, notice(`${companion.name} is deleted.`, 'ok'));
      await load();
    } catch (err) {
      const why = err.status === 409 ? ` It was not deleted: ${err.message}.` : '';
      fill(status, notice(why ? `${companion.name} is still here.${why}` : explain(err), 'error'));
    }
  }

  async function save(companion, what) {
    fill(status, notice(`Packing ${companion.name}…`));
    try {
      const blob = await api(what === 'card' ? `/companions/${companion.id}/card?format=png`
        : `/companions/${companion.id}/bundle`);
      download(blob, `${companion.id}.${what === 'card' ? 'png' : 'homefire'}`);
      fill(status, notice(what === 'card' ? `${companion.name}'s card is saved.`
        : `${companion.name} is saved whole: card, your history and memories, voices.`, 'ok'));
    } catch (err) {
      fill(status, notice(explain(err), 'error'));
    }
  }

  async function importBundle(file, asId = '') {
    fill(status, notice(`Checking ${file.name}…`));
    const as = asId ? `&as_id=${encodeURIComponent(asId)}` : '';
    try {
      const report = await api(`/bundles?filename=${encodeURIComponent(file.name)}${as}`,
        { method: 'POST', body: file });
      fill(status, notice(report.message, report.adapters_refused ? 'info' : 'ok'));
      await load();
    } catch (err) {
      if (err.status !== 409) return fill(status, notice(explain(err), 'error'));
      // The id is taken here: offer the same bundle under another one.
      const id = h('input', { name: 'as_id', required: true, pattern: '[a-z0-9][a-z0-9_\\-]{0,63}',
        'aria-label': 'Another id', title: 'lower-case letters, digits, - and _' });
      fill(status, notice(explain(err), 'error'),
        h('form', { class: 'inline import-as', onsubmit: (e) => { e.preventDefault(); importBundle(file, id.value.trim()); } },
          h('span', {}, 'Import it under another id:'), id, h('button', { type: 'submit' }, 'Import as this id')));
      id.focus();
    }
  }

  async function importCard(file) {
    if (file.name.endsWith('.homefire')) return importBundle(file);
    try {
      const companion = await api(`/companions/import?filename=${encodeURIComponent(file.name)}`,
        { method: 'POST', body: file });
      fill(status, notice(`${companion.name} is imported from ${file.name}.`, 'ok'));
      await load();
    } catch (err) {
      fill(status, notice(explain(err), 'error'));
    }
  }

  fill(root,
    h('div', { class: 'heading' }, h('h1', {}, 'Companions'),
      h('button', { type: 'button', onclick: () => edit(null) }, 'New companion')),
    dropZone('Import a Character Card (.png or .json) or a companion bundle (.homefire): drop it here or choose a file',
      '.png,.json,.homefire,image/png,application/json', importCard),
    status, editor, grid);
  await load();
}

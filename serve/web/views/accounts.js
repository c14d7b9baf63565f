// Accounts (admins): list users, add one (its key shown once), revoke, rotate.

import { api, explain } from '../api.js';
import { day, fill, h, notice } from '../dom.js';

export async function accountsView(root, { me }) {
  if (!me.admin) {
    fill(root, notice('Only an admin manages accounts.', 'error'));
    return;
  }
  const status = h('div', { class: 'status' });
  const table = h('tbody');
  const name = h('input', { name: 'name', required: true, pattern: '[a-z0-9](?:[a-z0-9_]|-(?!-)){0,31}',
    title: '1 to 32 lower-case letters, digits, _ or single -', 'aria-label': 'User name' });
  const shown = h('input', { name: 'display_name', placeholder: 'what companions call them (optional)', 'aria-label': 'Display name' });
  const admin = h('input', { type: 'checkbox', name: 'admin' });

  // A new key, once: it is not stored anywhere and cannot be shown again.
  function key(user, apiKey) {
    const field = h('input', { readonly: true, value: apiKey, class: 'key', 'aria-label': `API key of ${user}` });
    fill(status, h('div', { class: 'notice ok', role: 'status' },
      h('p', {}, `The key of ${user}, shown this once: give it to them now.`), field,
      h('button', { type: 'button', class: 'quiet', onclick: () => navigator.clipboard?.writeText(apiKey) }, 'Copy')));
    field.select();
  }

  async function act(work) {
    try {
      await work();
      await load();
    } catch (err) {
      fill(status, notice(explain(err), 'error'));
    }
  }

  async function load() {
    const users = await api('/users');
    fill(table, users.map((u) => h('tr', { 'data-user': u.name, class: u.revoked_at ? 'revoked' : null },
      h('td', {}, u.name), h('td', {}, u.display_name ?? ''), h('td', {}, u.admin ? 'admin' : 'user'),
      h('td', {}, day(u.created_at)), h('td', {}, u.revoked_at ? `revoked ${day(u.revoked_at)}` : 'active'),
      h('td', {}, u.name === me.name ? h('span', { class: 'hint' }, 'you') : [
        h('button', { type: 'button', class: 'link', onclick: () => confirm(`Give ${u.name} a new key? The old one stops working.`)
          && act(async () => key(u.name, (await api(`/users/${u.name}/rotate`, { method: 'POST' })).api_key)) },
        u.revoked_at ? 'Restore with a new key' : 'Rotate key'),
        u.revoked_at ? null : h('button', { type: 'button', class: 'link danger', onclick: () => confirm(`Revoke ${u.name}'s key? Their data stays.`)
          && act(async () => { await api(`/users/${u.name}/revoke`, { method: 'POST' }); fill(status, notice(`${u.name} is revoked.`, 'ok')); }) }, 'Revoke')]))));
  }

  const form = h('form', { class: 'card form', onsubmit: (e) => {
    e.preventDefault();
    act(async () => {
      const body = { name: name.value.trim(), admin: admin.checked };
      if (shown.value.trim()) body.display_name = shown.value.trim();
      const made = await api('/users', { method: 'POST', json: body });
      key(made.user.name, made.api_key);
      form.reset();
    });
  } }, h('h2', {}, 'Add a user'), h('label', {}, 'Name', name), h('label', {}, 'Display name', shown),
  h('label', { class: 'check' }, admin, ' Admin: manages users and shared companions'),
  h('button', { type: 'submit' }, 'Add'));

  fill(root, h('h1', {}, 'Accounts'),
    h('p', { class: 'hint' }, 'Each user sees only their own conversations and memories; admins manage users and shared companions.'),
    form, status,
    h('table', { class: 'users' }, h('thead', {}, h('tr', {}, ['Name', 'Display name', 'Role', 'Added', 'Key', '']
      .map((t) => h('th', {}, t)))), table));
  await load();
}

// Homefire's web app: sign in, then one view per section, chosen by the address's #fragment:
//   #/companions  #/chat/ID[/CONVERSATION]  #/group[/CONVERSATION]  #/memory/ID  #/world/ID  #/import/ID  #/voice/ID  #/accounts

import { api, explain, session } from './api.js';
import { fill, h, notice } from './dom.js';
import { accountsView } from './views/accounts.js';
import { chatView } from './views/chat.js';
import { companionsView } from './views/companions.js';
import { groupView } from './views/group.js';
import { importView } from './views/import.js';
import { memoryView } from './views/memory.js';
import { voiceView } from './views/voice.js';
import { worldView } from './views/world.js';

const main = document.getElementById('main');
const views = { companions: companionsView, chat: chatView, group: groupView, memory: memoryView, import: importView,
  voice: voiceView, world: worldView, accounts: accountsView };
let me = null;
let leave = null;   // what the current view does when it is left (stop a stream, ...)

function signInView() {
  document.getElementById('top').hidden = true;
  const key = h('input', { type: 'password', id: 'key', name: 'key', autocomplete: 'current-password',
    required: true, placeholder: 'hf_…' });
  const problem = h('div');
  const form = h('form', { class: 'card narrow', onsubmit: async (e) => {
    e.preventDefault();
    session.signIn(key.value.trim());
    try {
      me = await api('/me');
      location.hash = location.hash || '#/companions';
      await route();
    } catch (err) {
      fill(problem, notice(err.status === 401 ? 'That key is not known here (or it was revoked).'
        : explain(err), 'error'));
    }
  } },
  h('h1', {}, 'Sign in to Homefire'),
  h('label', { for: 'key' }, 'API key'), key,
  h('p', { class: 'hint' }, 'The owner\'s key: run ', h('code', {}, 'homefire user key'),
    ' on the server. It is kept in this tab only, until you sign out or close it.'),
  h('button', { type: 'submit' }, 'Sign in'), problem);
  fill(main, form);
  key.focus();
}

function shell(section, companion) {
  document.getElementById('top').hidden = false;
  document.getElementById('who').textContent = me.display_name || me.name;
  const links = [['companions', 'Companions'], ['group', 'Group chats']];
  if (companion) {
    links.push([`chat/${companion}`, 'Chat'], [`memory/${companion}`, 'Memory'], [`world/${companion}`, 'World'],
      [`import/${companion}`, 'Bring home'], [`voice/${companion}`, 'Voice']);
  }
  if (me.admin) links.push(['accounts', 'Accounts']);
  fill(document.getElementById('nav'), links.map(([path, label]) => h('a', {
    href: `#/${path}`, 'aria-current': path.split('/')[0] === section ? 'page' : null }, label)));
}

async function route() {
  if (leave) { leave(); leave = null; }
  if (!session.key) return signInView();
  if (!me) {
    try { me = await api('/me'); } catch { return signInView(); }
  }
  const [section = 'companions', ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  const view = views[section] ?? companionsView;
  const ofCompanion = !['companions', 'accounts', 'group'].includes(section);   // #/SECTION/COMPANION/...
  const companion = ofCompanion ? rest[0] : sessionStorage.getItem('homefire.companion');
  if (companion && ofCompanion) sessionStorage.setItem('homefire.companion', companion);
  shell(section, companion);
  const root = h('section', { class: `view ${section}` });
  fill(main, root);
  try {
    leave = await view(root, { me, args: rest.map(decodeURIComponent) });
  } catch (err) {
    fill(root, notice(explain(err), 'error', { label: 'Try again', run: route }));
  }
}

document.getElementById('sign-out').addEventListener('click', () => session.signOut());
window.addEventListener('homefire:signed-out', () => {
  if (!me) return;   // a key refused at sign-in: the form says so itself
  me = null;
  sessionStorage.removeItem('homefire.companion');
  history.replaceState(null, '', '/');
  route();
});
window.addEventListener('hashchange', route);
route();

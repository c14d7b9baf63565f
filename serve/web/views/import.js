// Bring a companion home: upload an export, see the dry run, then import with progress.

import { api, events, explain } from '../api.js';
import { day, dropZone, fill, h, notice, progressBar } from '../dom.js';

const FORMATS = [['', 'Detect the format'], ['chatgpt', 'ChatGPT'], ['claude', 'Claude'],
  ['characterai', 'Character.AI (CAI Tools)'], ['sillytavern', 'SillyTavern'], ['jsonl', 'Plain JSONL']];
const STAGES = { read: 'Reading the export', index: 'Remembering: indexing memories' };

export async function importView(root, { args: [companionId] }) {
  const companion = await api(`/companions/${companionId}`);
  const format = h('select', { name: 'format', 'aria-label': 'Format' },
    FORMATS.map(([value, label]) => h('option', { value }, label)));
  const out = h('div', { class: 'import-result' });
  let file = null;

  function path(dryRun) {
    const query = new URLSearchParams({ filename: file.name, dry_run: dryRun });
    if (format.value) query.set('format', format.value);
    return `/companions/${companionId}/imports?${query}`;
  }

  function summary(result, dryRun) {
    const would = dryRun ? 'would be imported' : 'imported';
    const dropped = Object.entries(result.dropped).filter(([, n]) => n);
    return h('dl', { class: 'summary' },
      h('dt', {}, 'Formats'), h('dd', {}, result.formats.join(', ')),
      h('dt', {}, `Conversations ${would}`), h('dd', { class: 'conversations' }, String(result.conversations_added),
        result.conversations_extended ? ` new, ${result.conversations_extended} continued` : '',
        result.conversations_unchanged ? ` (${result.conversations_unchanged} already here)` : ''),
      h('dt', {}, `Messages ${would}`), h('dd', { class: 'messages-count' }, String(result.messages_added)),
      dryRun ? null : [h('dt', {}, 'Memories'), h('dd', {}, String(result.memories_added))],
      result.first_at ? [h('dt', {}, 'Dates'), h('dd', {}, `${day(result.first_at)} to ${day(result.last_at)}`)] : null,
      dropped.length || result.conversations_empty || result.attachments ? [h('dt', {}, 'Left out'), h('dd', {},
        [...dropped.map(([why, n]) => `${n} ${why}`),
          result.conversations_empty ? `${result.conversations_empty} empty conversations` : null,
          result.attachments ? `${result.attachments} attachments without text` : null].filter(Boolean).join('; '))] : null);
  }

  function persona(result) {
    return result.suggested_persona.map((text) => h('div', { class: 'card persona' },
      h('h3', {}, 'Suggested persona (your custom instructions)'), h('blockquote', {}, text),
      h('button', { type: 'button', class: 'quiet', onclick: async (e) => {
        const card = await api(`/companions/${companionId}`);
        try {
          await api(`/companions/${companionId}`, { method: 'PUT',
            json: { ...card, description: [card.description, text].filter(Boolean).join('\n\n') } });
          e.target.replaceWith(notice(`Added to ${card.name}'s description.`, 'ok'));
        } catch (err) {
          e.target.replaceWith(notice(explain(err), 'error'));
        }
      } }, 'Apply to the card')));
  }

  async function check(chosen) {
    file = chosen;
    fill(out, notice(`Reading ${file.name}…`));
    try {
      const result = await api(path(true), { method: 'POST', body: file });
      fill(out, h('h2', {}, `${file.name}: what would come in`), summary(result, true), persona(result),
        h('p', { class: 'hint' }, 'Nothing is written yet. Importing the same export again adds only what is new.'),
        h('button', { type: 'button', id: 'run-import', onclick: run }, `Import into ${companion.name}`));
    } catch (err) {
      fill(out, notice(`${file.name}: ${explain(err)}`, 'error'));
    }
  }

  async function run() {
    const bar = progressBar('Import progress');
    fill(out, h('h2', {}, `Importing ${file.name}`), bar);
    try {
      await events(path(false), { method: 'POST', body: file, onEvent: (name, data) => {
        if (name === 'progress') bar.update(data.done, data.total, `${STAGES[data.stage] ?? data.stage}: ${data.done} of ${data.total}`);
        else if (name === 'done') {
          fill(out, h('h2', {}, 'Imported'), summary(data.result, false),
            h('p', {}, h('a', { href: `#/chat/${companionId}` }, `Talk to ${companion.name}`), ' · ',
              h('a', { href: `#/memory/${companionId}` }, 'See what it remembers')));
        } else if (name === 'error') throw new Error(data.error.message);
      } });
    } catch (err) {
      fill(out, notice(`Nothing was imported: ${explain(err)}`, 'error'));
    }
  }

  fill(root, h('h1', {}, `Bring ${companion.name} home`),
    h('p', {}, 'Your history from another app becomes this companion\'s history and memory. ',
      'ChatGPT (the .zip or conversations.json), Claude, Character.AI (CAI Tools), SillyTavern (.jsonl) or plain JSONL.'),
    h('div', { class: 'toolbar' }, format),
    dropZone('Drop an export here or choose a file', '.zip,.json,.jsonl,application/zip,application/json', check),
    out);
}

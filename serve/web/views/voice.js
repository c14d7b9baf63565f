// Voice: teach the companion its voice from your history (a training job of the server),
// follow it with a progress bar and a live loss chart, read each version's voice report,
// and switch or roll back versions.

import { api, events, explain } from '../api.js';
import { fill, h, notice, progressBar, when } from '../dom.js';

const OPEN = ['queued', 'running', 'evaluating'];
// A job of the voice queue, by its kind (a drift check or a migration may be started from the CLI).
const TITLES = { train: 'Training', eval: 'Voice report', drift: 'Drift check', migrate: 'Migration' };
const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  return el;
}

// A line chart of the training loss against the step, redrawn as points arrive.
function lossChart() {
  const width = 480, height = 160, pad = 28;
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'loss-chart', role: 'img',
    'aria-label': 'training loss by step' });
  const line = svg('polyline', { fill: 'none', 'stroke-width': 2, class: 'loss-line' });
  const low = svg('text', { x: 2, y: height - pad, class: 'axis' });
  const high = svg('text', { x: 2, y: pad - 6, class: 'axis' });
  chart.append(svg('line', { x1: pad, y1: height - pad, x2: width - 4, y2: height - pad, class: 'axis-line' }), line, low, high);
  const points = new Map();
  chart.add = (step, total, loss) => {
    if (step == null || loss == null) return;
    points.set(step, loss);
    const losses = [...points.values()];
    const top = Math.max(...losses), bottom = Math.min(...losses), span = top - bottom || 1;
    line.setAttribute('points', [...points].map(([s, l]) =>
      `${pad + (width - pad - 4) * (s / Math.max(total, 1))},${pad + (height - 2 * pad) * (1 - (l - bottom) / span)}`).join(' '));
    low.textContent = bottom.toFixed(2);
    high.textContent = top.toFixed(2);
  };
  return chart;
}

export async function voiceView(root, { args: [companionId] }) {
  const companion = await api(`/companions/${companionId}`);
  const versions = h('div');
  const running = h('div', { class: 'job' });
  const report = h('div', { class: 'report' });
  const steps = h('input', { type: 'number', name: 'max_steps', min: 1, placeholder: 'as configured', 'aria-label': 'Steps' });
  const rate = h('input', { type: 'number', name: 'learning_rate', step: 'any', min: 0, placeholder: 'as configured',
    'aria-label': 'Learning rate' });
  let following = null;

  async function loadVersions() {
    const listing = await api(`/companions/${companionId}/adapters`);
    const use = (version) => async () => {
      try {
        await api(`/companions/${companionId}/adapter`, { method: 'PUT', json: { version } });
        await loadVersions();
      } catch (err) {
        versions.prepend(notice(explain(err), 'error'));
      }
    };
    fill(versions, h('h2', {}, 'Versions'),
      listing.problem ? notice(listing.problem, 'error') : null,
      h('table', { class: 'versions' }, h('thead', {}, h('tr', {}, ['Version', 'Made', 'Held-out loss', 'In use', '']
        .map((t) => h('th', {}, t)))),
      h('tbody', {},
        h('tr', {}, h('td', {}, 'base model'), h('td', {}), h('td', {}), h('td', {}, listing.current ? '' : '✓'),
          h('td', {}, listing.current ? h('button', { type: 'button', class: 'quiet', onclick: use(null) }, 'Use the base model') : '')),
        listing.versions.map((v) => h('tr', { 'data-version': v.version },
          h('td', {}, v.version), h('td', {}, when(v.created_at)),
          h('td', {}, v.metrics?.eval_loss?.toFixed?.(3) ?? ''),
          h('td', {}, listing.current === v.version ? '✓' : ''),
          h('td', {},
            h('button', { type: 'button', class: 'link', onclick: () => showReport(v.version) }, 'Report'),
            listing.current === v.version || !v.fits_base_model ? null
              : h('button', { type: 'button', class: 'quiet', onclick: use(v.version) }, 'Use')))))));
  }

  async function showReport(version) {
    let result;
    try {
      result = await api(`/companions/${companionId}/adapters/${version}/report`);
    } catch (err) {
      fill(report, notice(explain(err), 'error'));
      return;
    }
    const plot = h('img', { alt: `Voice report of ${version}: perplexity and style, base against tuned`, class: 'plot' });
    api(`/companions/${companionId}/adapters/${version}/voice.png`).then((blob) => {
      const url = URL.createObjectURL(blob);
      plot.onload = () => URL.revokeObjectURL(url);   // drawn: the blob is no longer needed
      plot.src = url;
    });
    const p = result.perplexity, s = result.style, sim = result.similarity_to_real;
    const styleRows = ['words_mean', 'emoji_per_100_chars', 'exclamations_per_reply', 'questions_per_reply', 'lowercase_share'];
    fill(report, h('h2', {}, `Voice report: ${version}`),
      h('p', { class: 'hint' }, `Held out: ${result.held_out_examples} windows, ${result.held_out_tokens} tokens of real replies.`),
      result.sampling && h('p', { class: 'hint drawn' }, `Replies drawn as the companion speaks: base ${drawn(result.sampling.base)}; `
        + `tuned ${drawn(result.sampling.tuned)} (${result.sampling.fitted ? "the version's fitted sampling" : "the card's sampling"}).`),
      h('table', { class: 'figures' }, h('thead', {}, h('tr', {}, ['', 'base', 'tuned'].map((t) => h('th', {}, t)))),
        h('tbody', {},
          h('tr', {}, h('th', {}, 'perplexity of the real replies (lower is closer)'), h('td', {}, p.base.toFixed(2)), h('td', { class: 'perplexity-tuned' }, p.tuned.toFixed(2))),
          h('tr', {}, h('th', {}, 'similarity to the real reply'), h('td', {}, sim.base.toFixed(3)), h('td', {}, sim.tuned.toFixed(3))))),
      h('table', { class: 'figures' }, h('thead', {}, h('tr', {}, ['style', 'real', 'base', 'tuned'].map((t) => h('th', {}, t)))),
        h('tbody', {}, styleRows.map((key) => h('tr', {}, h('th', {}, key.replaceAll('_', ' ')),
          ['real', 'base', 'tuned'].map((who) => h('td', {}, s[who][key].toFixed(2))))))),
      discriminator(result.discriminator, result.samples_withheld),
      plot,
      h('h3', {}, 'Samples'),
      result.samples_withheld
        ? h('p', { class: 'hint' }, 'The samples come from the conversations of the member who ran this report; only they see them.')
        : h('ul', { class: 'samples' }, result.samples.map((sample) => h('li', {},
          h('p', {}, h('b', {}, 'real: '), sample.real), h('p', {}, h('b', {}, 'base: '), sample.base),
          h('p', {}, h('b', {}, 'tuned: '), sample.tuned)))));
  }

  // How a report's replies were drawn (reports from before sampling have no `sampling`).
  function drawn(d) {
    return d.do_sample === false ? 'greedily'
      : `at temperature ${d.temperature}, top-p ${d.top_p}, repetition penalty ${d.repetition_penalty}`;
  }

  // Could a reader tell them apart? 0.5 is a coin; real against real is what "no difference" reads.
  function discriminator(found, withheld) {
    if (!found) return h('p', { class: 'hint' }, 'This report was made before reports asked whether a reader could tell the replies apart: evaluate the version again to see it.');
    const told = found.told_apart, same = found.calibration || {};
    const cell = (scores, key) => h('td', {}, scores && scores[key] != null ? scores[key].toFixed(2) : '-');
    const tuned = told.tuned && told.tuned.characters;
    if (tuned == null) {
      return h('section', { class: 'discriminator' }, h('h3', {}, 'Could a reader tell them apart?'),
        h('p', { class: 'told-apart' }, `There are too few replies to say (${found.replies}; it takes at least 6 of each: more held-out history, or a larger finetune.samples).`));
    }
    const words = Math.round(tuned * 10) <= 5 ? 'A reader could not tell the tuned replies from the real ones: as good as a coin.'
        : `A reader tells the tuned replies from the real ones ${Math.round(tuned * 10)} times in 10.`;
    const parts = [h('h3', {}, 'Could a reader tell them apart?'),
      h('p', { class: 'told-apart' }, words),
      h('table', { class: 'figures' }, h('thead', {}, h('tr', {}, ['told apart by', 'real vs base', 'real vs tuned', 'real vs real'].map((t) => h('th', {}, t)))),
        h('tbody', {}, [['characters', 'how it is written'], ['meaning', 'what it says']].map(([key, label]) =>
          h('tr', {}, h('th', {}, label), cell(told.base, key), cell(told.tuned, key), cell(same, key))))),
      h('p', { class: 'hint' }, `A classifier learned to tell ${found.replies} real replies from generated ones to the same prompts: 0.50 means it guessed, 1.00 that it was always right. To come closer: more history, more steps, or a bigger base model.`)];
    if (found.signatures.length) {
      const pct = (x) => `${Math.round((x ?? 0) * 100)}%`;
      parts.push(h('table', { class: 'figures signatures' }, h('thead', {}, h('tr', {}, ['phrase the real replies use', 'real', 'base', 'tuned'].map((t) => h('th', {}, t)))),
        h('tbody', {}, found.signatures.map((p) => h('tr', {}, h('th', {}, h('code', {}, p.phrase)), h('td', {}, pct(p.real)), h('td', {}, pct(p.base)), h('td', {}, pct(p.tuned)))))));
    } else if (withheld) {
      parts.push(h('p', { class: 'hint' }, 'The phrases the real replies use come from the conversations of the member who ran this report; only they see them.'));
    }
    return h('section', { class: 'discriminator' }, parts);
  }

  function describe(job) {
    const parts = [job.state];
    if (job.state === 'queued' && job.queue_position) parts.push(`number ${job.queue_position} in the queue`);
    if (job.waiting) parts.push(job.waiting);
    if (job.step != null && job.total_steps) parts.push(`step ${job.step} of ${job.total_steps}`);
    if (job.loss != null) parts.push(`loss ${job.loss.toFixed(3)}`);
    if (job.eval_loss != null) parts.push(`held-out ${job.eval_loss.toFixed(3)}`);
    if (job.eta_s != null && job.state === 'running') parts.push(`about ${Math.round(job.eta_s)} s left`);
    return parts.join(' · ');
  }

  async function follow(job) {
    following?.abort();
    following = new AbortController();
    const bar = progressBar('Training progress');
    const chart = lossChart();
    const cancel = h('button', { type: 'button', class: 'danger', onclick: async () => {
      try { await api(`/finetunes/${job.id}/cancel`, { method: 'POST' }); } catch (err) { running.append(notice(explain(err), 'error')); }
    } }, 'Cancel');
    fill(running, h('h2', {}, `${TITLES[job.kind] ?? 'Job'} ${job.version ?? ''}`), bar, chart, cancel);
    const show = (current) => {
      bar.update(current.step ?? 0, current.total_steps ?? 1, describe(current));
      chart.add(current.step, current.total_steps, current.loss);
    };
    show(job);
    try {
      await events(`/finetunes/${job.id}`, { signal: following.signal, onEvent: (name, data) => {
        show(data);
        if (name === 'done') ended(data);
      } });
    } catch (err) {
      if (err.name !== 'AbortError') running.append(notice(explain(err), 'error'));
    }
  }

  async function ended(job) {
    const words = {
      done: job.kind !== 'train' ? `Done${job.version ? `: ${job.version}` : ''}.`
        : `Done: ${job.version}. ${job.switched ? `${companion.name} now speaks with it` : `Not switched: ${job.switch_reason ?? 'as set'}`}.`,
      failed: `The training failed: ${job.error}`, cancelled: 'Cancelled; no version was kept.',
      interrupted: 'Interrupted by a server stop; resume it to go on from its last checkpoint.',
    };
    running.querySelector('button.danger')?.remove();
    running.append(notice(words[job.state] ?? job.state, job.state === 'done' ? 'ok' : 'error',
      job.state === 'interrupted' ? { label: 'Resume', run: async () => follow(await api(`/finetunes/${job.id}/resume`, { method: 'POST' })) } : null));
    await loadVersions();
    if (job.state !== 'done' || !job.version || !job.voice) return;   // a drift or a migration: no report
    if (job.voice?.error) fill(report, notice(`No voice report for ${job.version}: ${job.voice.error}`, 'error'));
    else await showReport(job.version);
  }

  const start = h('form', { class: 'card form', onsubmit: async (e) => {
    e.preventDefault();
    const overrides = {};
    if (steps.value) overrides.max_steps = Number(steps.value);
    if (rate.value) overrides.learning_rate = Number(rate.value);
    try {
      follow(await api(`/companions/${companionId}/finetunes`, { method: 'POST', json: overrides }));
    } catch (err) {
      fill(running, notice(explain(err), 'error'));
    }
  } },
  h('h2', {}, 'Teach the voice'),
  h('p', {}, `${companion.name} learns from your own conversations with it. The server trains at low priority and `,
    'switches to the new version only if it matches your history better than the one in use.'),
  h('div', { class: 'row' }, h('label', {}, 'Steps', steps), h('label', {}, 'Learning rate', rate)),
  h('button', { type: 'submit', id: 'start-training' }, 'Start training'));

  fill(root, h('h1', {}, `${companion.name}'s voice`), start, running, versions, report);
  await loadVersions();
  const jobs = await api('/finetunes');
  const open = jobs.find((j) => j.companion === companionId && OPEN.includes(j.state));
  if (open) follow(open);
  return () => following?.abort();
}

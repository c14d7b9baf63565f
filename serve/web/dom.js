// Building the page from data. Text is always added as text (a Text node or textContent),
// never parsed as HTML: a message, a memory or a name that looks like markup stays words.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value == null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.className = value;
    else if (['value', 'checked', 'disabled', 'hidden', 'open', 'multiple'].includes(name)) el[name] = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// Replace everything inside el.
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function day(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleDateString(undefined,
    { year: 'numeric', month: 'short', day: 'numeric' }) : '';
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString(undefined,
    { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' }) : '';
}

// A line that says what happened; kind: info | error | ok.
export function notice(text, kind = 'info', action = null) {
  return h('p', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text,
    action && h('button', { type: 'button', class: 'link', onclick: action.run }, action.label));
}

// A progress bar with its words: update(done, total, text).
export function progressBar(label) {
  const bar = h('progress', { max: 1, value: 0, 'aria-label': label });
  const words = h('span', { class: 'progress-words' });
  const el = h('div', { class: 'progress' }, bar, words);
  el.update = (done, total, text) => {
    bar.max = total || 1;
    bar.value = Math.min(done, total || 1);
    words.textContent = text ?? `${done} of ${total}`;
  };
  return el;
}

// Read a dropped or chosen file: calls onFile(file) for a drop on el or a choice in its input.
export function dropZone(label, accept, onFile) {
  const input = h('input', { type: 'file', accept, class: 'file', 'aria-label': label,
    onchange: () => {
      const file = input.files[0];
      input.value = '';   // so that choosing the same file again is a change too
      if (file) onFile(file);
    } });
  const zone = h('label', { class: 'drop' }, h('span', {}, label), input);
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    if (e.dataTransfer.files[0]) onFile(e.dataTransfer.files[0]);
  });
  return zone;
}

// Offer a Blob as a file to save.
export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = h('a', { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

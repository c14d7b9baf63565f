// The API at /api/v1, with the key kept for this browser tab's session only (sessionStorage):
// never in a URL, never in a cookie, gone when the tab closes or on sign-out.

const KEY = 'homefire.key';

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  signIn(key) { sessionStorage.setItem(KEY, key); },
  signOut() {
    sessionStorage.removeItem(KEY);
    window.dispatchEvent(new Event('homefire:signed-out'));
  },
};

export class ApiError extends Error {
  constructor(status, message, { retryAfter = null, code = null } = {}) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.code = code;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    message = body.error?.message ?? body.detail ?? message;
    code = body.error?.code ?? null;
  } catch { /* not JSON: the status line says it */ }
  if (response.status === 401) session.signOut();
  const retryAfter = Number(response.headers.get('retry-after')) || null;
  return new ApiError(response.status, message, { retryAfter, code });
}

async function send(path, { method = 'GET', json, body, accept, signal } = {}) {
  const extra = {};
  if (json !== undefined) {
    extra['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  if (accept) extra.Accept = accept;
  let response;
  try {
    response = await fetch(`/api/v1${path}`, { method, headers: headers(extra), body, signal });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'The server cannot be reached. Is `homefire serve` still running?');
  }
  if (!response.ok) throw await failure(response);
  return response;
}

// JSON (or a Blob for images; null for 204).
export async function api(path, options = {}) {
  const response = await send(path, options);
  if (response.status === 204) return null;
  const type = response.headers.get('content-type') ?? '';
  return type.includes('json') ? response.json() : response.blob();
}

// Server-sent events: onEvent(name, data) for each event until the stream ends.
export async function events(path, { onEvent, ...options }) {
  const response = await send(path, { ...options, accept: 'text/event-stream' });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event: ')) name = line.slice(7);
        else if (line.startsWith('data: ')) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, JSON.parse(data.join('\n')));
    }
  }
}

// A stream's error event comes after its 200: it names the status by its type (OpenAI's
// shape), and what a 503 would say in Retry-After as retry_after.
const STREAMED_STATUS = { engine_unavailable: 503, engine_error: 502, rate_limit_error: 429,
  not_found_error: 404, conflict_error: 409, invalid_request_error: 400 };

export function streamedError(error) {
  return new ApiError(STREAMED_STATUS[error.type] ?? 500, error.message,
    { retryAfter: error.retry_after ?? null, code: error.code ?? null });
}

// What went wrong, in words a person can act on.
export function explain(err) {
  const said = (err.message || String(err)).replace(/\.?$/, '.');
  if (err.status === 429) return `Too busy for now: ${said}`;
  if (err.status === 503) {
    return err.retryAfter ? `${said} Try again in about ${err.retryAfter} s.` : said;
  }
  return said;
}

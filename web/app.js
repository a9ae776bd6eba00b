// NanoChat browser client: rooms by link, end-to-end encryption in the page, proof of work in
// a worker, reconnect with resume, panic button. Protocol: docs/protocol.md.
import { RoomKeys, RoomSession, b64u, fromB64u, joinProof, randomBytes } from './crypto.js';

const $ = (id) => document.getElementById(id);

/** The page's two workers: proof of work, and notifications (see notifyWorker()). */
const POW_WORKER = new URL('./pow-worker.js', import.meta.url).href;
const NOTIFY_WORKER = new URL('./notify-worker.js', import.meta.url).href;

/**
 * The Content-Security-Policy requires Trusted Types: the one policy the page may make admits
 * the URLs of the two workers and nothing else.
 */
const scriptUrls = globalThis.trustedTypes?.createPolicy('nanochat', {
  createScriptURL: (url) => {
    if (url !== POW_WORKER && url !== NOTIFY_WORKER) {
      throw new TypeError(`not a script of this page: ${url}`);
    }
    return url;
  },
});

function scriptUrl(url) {
  return scriptUrls ? scriptUrls.createScriptURL(url) : url;
}

/** How many days this server keeps messages (its `retention.days`, written into the page). */
const RETENTION_DAYS = Number(document.querySelector('meta[name="nanochat-retention-days"]')?.content) || 30;

/** Server error codes as sentences a person can act on. */
const ERRORS = {
  bad_request: 'The server did not understand that. Check that your device clock is right.',
  too_large: 'That message is too long to send.',
  unknown_type: 'This page and the server do not speak the same version. Reload the page.',
  auth_failed: 'This link does not open a room on this server. It may be mistyped, or the room '
    + `expired after ${RETENTION_DAYS} days without messages.`,
  room_exists: 'A room with this link already exists.',
  room_gone: 'This room was wiped.',
  not_joined: 'Not in a room yet; wait for the connection.',
  already_joined: 'Already in a room.',
  rate_limited: 'You are going a bit fast. Please wait a moment.',
  pow_required: 'The server asks for a little work before creating a room; trying again.',
  pow_invalid: 'The anti-spam work was not accepted. Please try again.',
  replay: 'That message was already delivered.',
  unavailable: 'The server cannot store messages right now. Please try again in a moment.',
  internal: 'Something went wrong on the server.',
};

const state = {
  keys: null,
  session: null,
  ws: null,
  mode: null, // 'create' | 'join'
  challenge: null,
  joined: false,
  everJoined: false,
  lastSeq: 0,
  firstSeq: null,
  seen: new Set(),
  pending: new Map(), // ref -> { frame, el, status }
  backoff: 500,
  stopped: false,
  worker: null,
  historyFilling: false,
  fillPause: 0, // between catch-up pages: each refusal for now adds the wait it asked for
  fillMode: 'after', // how the catch-up goes on: see requestFill()
  unsure: false, // a send went out on a socket lost before its answer: catch up on everything
  chain: Promise.resolve(),
  unread: 0, // others' new messages while the page was hidden, shown in the tab's title
  maxCt: 0, // the server's largest ciphertext, from `hello`
  powBits: 0, // the proof of work creating a room needs, from `hello`
  tooLong: false, // the notice shows that the text in the box is too long
  remembered: false, // this session's sid is in `nanochat.sessions`
  answerTimer: null, // set while the socket owes an answer; it fires if none comes
  lastFrameAt: 0,
  lastProbeAt: 0,
  highestStored: 0, // the highest counter of this session known to be stored
  flushAfterFill: false, // send what is pending once the catch-up after a reconnect is done
  refused: [], // refs of sends refused for now, to go again one at a time
  resendTimer: null,
  resendWait: 1000,
  clockOffset: 0, // the server's clock minus this device's, from `hello`
  notification: null, // the system notification shown for unread messages, if made here
  notified: false, // one may be shown for this room: closed once the messages are seen
  notifyBroken: false, // this browser refused to show one: see notifyUnread()
};

/** Refusals of a send that pass: the page sends it again by itself, this many times. */
const AUTO_RESEND = new Set(['rate_limited', 'unavailable']);
const AUTO_RESENDS = 5;

/** The messages a page keeps shown (more while the reader is scrolled up, or pages in older
 * ones), forgetting the oldest in steps of FORGET_STEP. */
const KEEP_SHOWN = 1000;
const FORGET_STEP = 100;

/** How long a socket may stay silent after it was asked something before it counts as dead. */
const ANSWER_MS = { send: 10_000, probe: 5_000 };
/** A socket heard from this recently is not probed. */
const QUIET_MS = 15_000;

function setStatus(kind, text) {
  const s = $('status');
  s.dataset.state = kind;
  s.textContent = text;
}

function notice(text) {
  const n = $('notice');
  if (!text) {
    n.hidden = true;
    return;
  }
  n.textContent = text;
  n.hidden = false;
}

function show(section) {
  for (const id of ['landing', 'room', 'gone']) $(id).hidden = id !== section;
  showNotifyChoice();
}

function wsUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}/ws`;
}

function nick() {
  const n = $('nick').value.trim().slice(0, 64);
  return n || 'anonymous';
}

// ---- this device's own sessions ---------------------------------------------------------

/**
 * The sids of this browser's sessions that wrote in each room, so that its own messages still
 * show as its own after a reload. On this device only; a room's entry is forgotten a day past
 * the server's retention after its last use (its messages have expired by then) and when the
 * room is wiped. Each
 * window keeps its own fresh sid: two windows sharing one would break each other's replay
 * counters.
 */
const SESSIONS = 'nanochat.sessions';
const SESSIONS_KEPT_MS = (RETENTION_DAYS + 1) * 86_400_000;

function storedSessions() {
  try {
    const all = JSON.parse(localStorage.getItem(SESSIONS));
    return all && typeof all === 'object' ? all : {};
  } catch {
    return {};
  }
}

function saveSessions(all) {
  try {
    localStorage.setItem(SESSIONS, JSON.stringify(all));
  } catch {
    // Storage full or disabled: own messages then show as others' after a reload, nothing more.
  }
}

function roomKey() {
  return b64u(state.keys.roomId);
}

function earlierSessions() {
  const sids = storedSessions()[roomKey()]?.sids;
  return Array.isArray(sids) ? sids : [];
}

function rememberSession() {
  if (state.remembered) return;
  state.remembered = true;
  const all = storedSessions();
  const now = Date.now();
  for (const [room, entry] of Object.entries(all)) {
    if (!(now - entry?.at < SESSIONS_KEPT_MS)) delete all[room];
  }
  const sids = earlierSessions().filter((s) => s !== state.session.sid);
  all[roomKey()] = { sids: [...sids, state.session.sid].slice(-100), at: now };
  saveSessions(all);
}

function forgetRoom() {
  const all = storedSessions();
  delete all[roomKey()];
  saveSessions(all);
}

// ---- messages --------------------------------------------------------------------------

/**
 * Now by the server's clock. A device's clock may be days off (its TLS still works: a
 * certificate is valid for months), and the server takes a send only within a day of its own
 * epoch (docs/protocol.md §4), so what is sent is dated by the server's clock.
 */
function serverNow() {
  return Date.now() + state.clockOffset;
}

/** When a message was stored, by the server's clock (a sender's own clock may be wrong, or
 * lie): the time, and the date too when it was not today. Empty for what is not a time. */
function timeOf(ts) {
  const d = new Date(ts);
  if (!Number.isFinite(ts) || Number.isNaN(d.getTime())) return '';
  const now = new Date(serverNow());
  const opts = { hour: '2-digit', minute: '2-digit' };
  if (d.toDateString() !== now.toDateString()) {
    opts.month = 'short';
    opts.day = 'numeric';
    if (d.getFullYear() !== now.getFullYear()) opts.year = 'numeric';
  }
  return d.toLocaleString([], opts);
}

/**
 * The hue a nickname is shown in, from its exact characters (FNV-1a over its UTF-16 units): a
 * look-alike ("alice" with a Cyrillic а, or with an invisible character) almost always gets
 * another colour, and a name the same colour everywhere. Not an identity: anyone may type the
 * same name.
 */
function nickHue(nick) {
  let h = 0x811c9dc5;
  for (let i = 0; i < nick.length; i += 1) {
    h ^= nick.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0) % 360;
}

function messageElement(env, seq, own, ts) {
  const li = document.createElement('li');
  li.dataset.seq = seq ?? '';
  if (own) li.classList.add('own');
  const who = document.createElement('span');
  who.className = 'nick';
  who.textContent = env.nick;
  who.style.setProperty('--hue', String(nickHue(env.nick)));
  const text = document.createElement('span');
  text.className = 'text';
  appendWithLinks(text, env.text);
  const meta = document.createElement('span');
  meta.className = 'meta';
  li.append(who, text, meta);
  showTime(li, ts);
  return li;
}

function showTime(li, ts) {
  const meta = li.querySelector('.meta');
  meta.textContent = timeOf(ts);
  meta.title = meta.textContent ? new Date(ts).toLocaleString() : '';
}

const URL_IN_TEXT = /\bhttps?:\/\/[^\s<>"]+/gi;

/**
 * Append a message's text to `el` as text nodes, never HTML, with its http(s) addresses as
 * links that open in a new tab without telling the site where they came from. Punctuation that
 * ends a sentence is not part of the address, nor is a closing bracket that opens nowhere in it.
 */
function appendWithLinks(el, text) {
  let at = 0;
  for (const m of text.matchAll(URL_IN_TEXT)) {
    let url = m[0].replace(/[.,;:!?'*]+$/, '');
    while (url.endsWith(')') && url.split(')').length > url.split('(').length) {
      url = url.slice(0, -1).replace(/[.,;:!?'*]+$/, '');
    }
    let parsed = null;
    try {
      parsed = new URL(url);
    } catch {
      parsed = null;
    }
    if (!parsed || !parsed.hostname) continue;
    el.append(text.slice(at, m.index));
    const a = document.createElement('a');
    a.href = parsed.href;
    a.textContent = url;
    a.target = '_blank';
    a.rel = 'noopener noreferrer nofollow';
    el.append(a);
    at = m.index + url.length;
  }
  el.append(text.slice(at));
}

function insertBySeq(li, seq) {
  const list = $('messages');
  // Own pending messages (no seq yet) stay at the end; received ones go in seq order, looked
  // for from the end, where new ones belong.
  let next = null;
  for (let other = list.lastElementChild; other; other = other.previousElementSibling) {
    if (other.dataset.seq !== '' && Number(other.dataset.seq) <= seq) break;
    next = other;
  }
  list.insertBefore(li, next);
}

/**
 * A page left open keeps at most about KEEP_SHOWN messages: when a reader at the end has more,
 * the oldest go (with what the page remembered of them) and "Load older messages" brings them
 * back. Returns whether any went.
 */
function forgetOldest() {
  const list = $('messages');
  if (list.children.length <= KEEP_SHOWN + FORGET_STEP) return false;
  // Pending ones (no seq yet, at the end) are never forgotten.
  const firstKept = list.children[list.children.length - KEEP_SHOWN].dataset.seq;
  return firstKept !== '' && forgetBefore(Number(firstKept));
}

/**
 * Forget the stored messages below seq `first`: off the screen, out of the seen set and the
 * replay state; "Load older messages" brings them back. Returns whether any went.
 */
function forgetBefore(first) {
  const gone = [...$('messages').children]
    .filter((li) => li.dataset.seq !== '' && Number(li.dataset.seq) < first);
  if (gone.length === 0) return false;
  for (const li of gone) li.remove();
  state.firstSeq = first;
  for (const seq of state.seen) if (seq < first) state.seen.delete(seq);
  state.session.forgetBefore(first);
  $('older').hidden = false;
  return true;
}

/**
 * Show received messages in seq order, all in one change of the view. `how` says what they
 * are to the reader: 'new' (live, or caught up after a reconnect: counted as unread while the
 * page is hidden), 'shown' (the history shown on opening the room) or 'older' (a page of older
 * history they asked for, added above what they are reading). `alsoChange` runs in the same
 * change (showing or hiding the "older" button above them).
 */
async function receive(msgs, how, alsoChange = () => {}) {
  const opened = [];
  for (const msg of msgs) {
    if (state.seen.has(msg.seq)) continue;
    state.seen.add(msg.seq);
    state.lastSeq = Math.max(state.lastSeq, msg.seq);
    state.firstSeq = state.firstSeq === null ? msg.seq : Math.min(state.firstSeq, msg.seq);
    const env = await state.session.open(msg);
    if (env) opened.push({ env, seq: msg.seq, ts: msg.ts }); // else undecryptable or replayed: dropped and counted
  }
  const following = keepPlace(() => {
    for (const { env, seq, ts } of opened) {
      insertBySeq(storedOwn(env, seq, ts) ?? messageElement(env, seq, env.own, ts), seq);
    }
    alsoChange();
  }, how !== 'older');
  if (following && forgetOldest()) toEnd();
  const fromOthers = opened.filter(({ env }) => !env.own).length;
  if (how === 'new' && fromOthers > 0) {
    if (!following) $('jump').hidden = false;
    if (document.hidden) {
      state.unread += fromOthers;
      showUnread();
    }
  }
}

/**
 * A message of this very session, read back from the server: its `ack` was lost with a socket.
 * It is stored, so it is no longer pending; its element (already shown) is returned, to be
 * moved to its place instead of showing the message twice.
 */
function storedOwn(env, seq, ts) {
  if (env.sid !== state.session.sid) return null;
  state.highestStored = Math.max(state.highestStored, env.n);
  for (const [ref, p] of state.pending) {
    if (p.n === env.n) {
      p.el.dataset.seq = seq;
      markPending(ref, 'sent', ts);
      state.pending.delete(ref);
      return p.el;
    }
  }
  return null;
}

/**
 * Send what is still pending after a (re)join and its catch-up, which showed every message
 * stored since. Receivers take a session's counters only in the order they were stored: those
 * above every stored counter go unchanged, in order (one may be stored after all: its IV gets
 * `replay`); any below one (refused, its answer lost with the socket) go after them, sealed
 * anew.
 */
async function flushPending() {
  const waiting = [...state.pending.entries()].sort(([, a], [, b]) => a.n - b.n);
  for (const [ref, p] of waiting) if (p.n > state.highestStored) transmit(ref);
  for (const [ref, p] of waiting) if (p.n < state.highestStored) await resend(ref);
}

function atEnd() {
  const s = $('scroller');
  return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
}

function toEnd() {
  const s = $('scroller');
  s.scrollTop = s.scrollHeight;
  $('jump').hidden = true;
}

/**
 * Change the conversation without moving what the reader is looking at: with `follow`,
 * someone at the end stays at the end (and sees the new message); otherwise the message at the
 * top of their view stays exactly where it was, whether lines arrive below it or older history
 * above it. Returns whether the view followed the end.
 */
function keepPlace(change, follow) {
  const s = $('scroller');
  if (follow && atEnd()) {
    change();
    toEnd();
    return true;
  }
  const top = s.getBoundingClientRect().top;
  const anchor = [...$('messages').children].find((li) => li.getBoundingClientRect().bottom > top);
  const before = anchor?.getBoundingClientRect().top;
  change();
  if (anchor?.isConnected) s.scrollTop += anchor.getBoundingClientRect().top - before;
  return false;
}

function showUnread() {
  document.title = state.unread > 0 ? `(${state.unread}) NanoChat` : 'NanoChat';
  if (state.unread > 0) notifyUnread();
  else closeNotification();
}

// ---- the link as a QR code -------------------------------------------------------------

/** Show or hide the room's link as a QR code (drawn here: web/qr.js, loaded on first use). */
async function toggleQr() {
  const figure = $('qr');
  const show = figure.hidden;
  figure.hidden = !show;
  $('show-qr').setAttribute('aria-expanded', String(show));
  figure.querySelector('svg, .warning')?.remove();
  if (!show) return;
  let drawn;
  try {
    const { qrSvg } = await import('./qr.js');
    drawn = qrSvg($('link').value, 'QR code of the room link');
  } catch (e) {
    drawn = document.createElement('p');
    drawn.className = 'warning';
    drawn.textContent = e instanceof RangeError
      ? 'This link is too long for a QR code: copy it instead.'
      : 'The QR code could not be loaded. Check the connection and try again.';
  }
  // Hidden again meanwhile, or drawn by another click: nothing to add.
  if (!figure.hidden && !figure.querySelector('svg, .warning')) figure.prepend(drawn);
}

// ---- notifications ---------------------------------------------------------------------

/**
 * Optional system notifications for others' messages while the tab is not in view: how many,
 * never who or what (notification centres and lock screens keep and show them). One per room,
 * each replacing the last. Asked for by a click on "Notify me"; the choice is this device's.
 */
const NOTIFY = 'nanochat.notify';

/**
 * Where there is one (any browser but Tor Browser and private windows of some), the page shows
 * its notifications through web/notify-worker.js: Chrome on Android shows them only from a
 * service worker. The worker is registered while notifications are on and unregistered when
 * they are turned off. Elsewhere the page makes them itself.
 */
/** How long registering the worker may take before the page makes its notifications itself. */
const WORKER_READY_MS = 10_000;
/** This tab, to the worker: a click on its notification brings it to the front. */
const TAB = b64u(randomBytes(12));

function notifyOn() {
  try {
    return localStorage.getItem(NOTIFY) === '1' && Notification.permission === 'granted';
  } catch {
    return false;
  }
}

function showNotifyChoice() {
  const b = $('notify');
  b.hidden = $('room').hidden || !('Notification' in window) || state.notifyBroken;
  b.setAttribute('aria-pressed', String(!b.hidden && notifyOn()));
}

async function toggleNotify() {
  const on = !notifyOn();
  if (on && Notification.permission !== 'granted') {
    const answer = await Notification.requestPermission();
    if (answer !== 'granted') {
      notice('This browser blocks notifications from this site: allow them in its site settings.');
      return;
    }
  }
  try {
    localStorage.setItem(NOTIFY, on ? '1' : '0');
  } catch {
    // Storage disabled: the choice cannot be kept.
  }
  if (!on) forgetNotifyWorker();
  showNotifyChoice();
}

/** The worker's registration once it is active; null where there is none. */
async function notifyWorker() {
  const container = navigator.serviceWorker;
  if (!container) return null;
  try {
    // Registering again what is registered is answered with the registration: no download.
    const reg = await container.register(scriptUrl(NOTIFY_WORKER), { updateViaCache: 'none' });
    if (reg.active) return reg;
    const worker = reg.installing ?? reg.waiting;
    return await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(null), WORKER_READY_MS);
      worker?.addEventListener('statechange', () => {
        if (worker.state === 'activated' || worker.state === 'redundant') {
          clearTimeout(timer);
          resolve(worker.state === 'activated' ? reg : null);
        }
      });
    });
  } catch {
    return null;
  }
}

/** Turned off: this site's notifications go, and so does the worker. */
async function forgetNotifyWorker() {
  closeNotification();
  try {
    const reg = await navigator.serviceWorker?.getRegistration(NOTIFY_WORKER);
    if (!reg) return;
    for (const n of await reg.getNotifications()) n.close();
    await reg.unregister();
  } catch {
    // Nothing registered, or storage disabled.
  }
}

/** Tell the worker whether a notification it was clicked on is this tab's. */
function answerNotifyWorker() {
  const container = navigator.serviceWorker;
  if (!container) return;
  container.addEventListener('message', (e) => {
    if (e.data?.nanochatTab !== undefined) e.ports[0]?.postMessage(e.data.nanochatTab === TAB);
  });
  container.startMessages();
}

function notificationTag() {
  return `nanochat-${roomKey()}`;
}

async function notifyUnread() {
  if (!document.hidden || !notifyOn() || state.notifyBroken) return;
  const tag = notificationTag();
  const body = () => (state.unread === 1 ? '1 new message' : `${state.unread} new messages`);
  state.notified = true;
  const reg = await notifyWorker();
  // Seen, or another message came, while the worker was asked for: this call has no work.
  if (!document.hidden || state.unread === 0 || tag !== notificationTag()) return;
  try {
    if (reg) {
      await reg.showNotification('NanoChat', { body: body(), tag, data: { tab: TAB } });
      if (!document.hidden || state.unread === 0) closeNotification();
      return;
    }
    state.notification = new Notification('NanoChat', { body: body(), tag });
    state.notification.onclick = () => {
      window.focus();
      state.notification?.close();
    };
  } catch {
    // Neither a worker nor the page may show one here: the tab's title still counts, and the
    // choice is not offered again.
    state.notifyBroken = true;
    showNotifyChoice();
  }
}

function closeNotification() {
  state.notification?.close();
  state.notification = null;
  if (!state.notified || !state.keys) return;
  state.notified = false;
  const tag = notificationTag();
  navigator.serviceWorker?.getRegistration(NOTIFY_WORKER)
    .then((reg) => reg?.getNotifications({ tag }))
    .then((shown) => shown?.forEach((n) => n.close()))
    .catch(() => {});
}

/** Show a pending message's state: 'sending', 'sent' (`detail`: when it was stored, if known)
 * or 'failed' (`detail`: why). */
function markPending(ref, status, detail) {
  const p = state.pending.get(ref);
  if (!p) return;
  p.status = status;
  const meta = p.el.querySelector('.meta');
  p.el.classList.toggle('failed', status === 'failed');
  p.el.dataset.status = status;
  if (status === 'sent') showTime(p.el, detail ?? serverNow());
  else meta.textContent = status === 'sending' ? 'sending…' : detail;
  if (status === 'failed') {
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.textContent = 'Retry';
    retry.addEventListener('click', () => {
      p.retries = 0;
      markPending(ref, 'sending');
      resend(ref);
    });
    meta.append(' ', retry);
  }
}

function transmit(ref) {
  const p = state.pending.get(ref);
  if (p && state.joined && state.ws?.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(p.frame));
    p.unanswered = true;
    expectAnswer(ANSWER_MS.send);
  }
}

/**
 * Queue a send refused for now. The queue goes out one message per wait the server named: all
 * of them at once would meet the same limit again, and use up their tries together.
 */
function later(ref, wait) {
  const n = (r) => state.pending.get(r)?.n ?? 0;
  state.refused = [...state.refused.filter((r) => r !== ref), ref].sort((a, b) => n(a) - n(b));
  state.resendWait = Math.min(Math.max(wait, 100), 30_000);
  clearTimeout(state.resendTimer);
  state.resendTimer = setTimeout(resendNext, state.resendWait);
}

async function resendNext() {
  state.resendTimer = null;
  const ref = state.refused.shift();
  if (ref === undefined) return;
  await resend(ref);
  if (state.refused.length > 0 && !state.resendTimer) {
    state.resendTimer = setTimeout(resendNext, state.resendWait);
  }
}

/**
 * Send again a message the server refused (so did not store): sealed anew, with the next
 * counter. Messages written after it may have been stored meanwhile, and receivers accept a
 * session's counters only in the order they were stored (docs/protocol.md §2).
 */
async function resend(ref) {
  const p = state.pending.get(ref);
  if (!p) return;
  const sealed = await state.session.seal(p.nick, p.text, serverNow(), state.maxCt);
  p.frame = { type: 'send', ref, epoch: sealed.epoch, iv: sealed.iv, ct: sealed.ct };
  p.n = sealed.envelope.n;
  transmit(ref);
}

async function sendText(text) {
  if (!text.trim() || !state.session) return;
  const sealed = await state.session.seal(nick(), text, serverNow(), state.maxCt);
  const ref = b64u(randomBytes(9));
  const frame = { type: 'send', ref, epoch: sealed.epoch, iv: sealed.iv, ct: sealed.ct };
  const el = messageElement(sealed.envelope, null, true, serverNow());
  $('messages').append(el);
  state.pending.set(ref, {
    frame, el, status: 'sending', retries: 0, nick: sealed.envelope.nick, text, n: sealed.envelope.n,
  });
  markPending(ref, 'sending');
  toEnd(); // what you write is always shown, wherever you were reading
  rememberSession();
  transmit(ref); // if offline, it goes out on reconnect
}

// ---- proof of work ---------------------------------------------------------------------


function solvePow(token, roomId, bits) {
  return new Promise((resolve, reject) => {
    const expected = 2 ** bits;
    const worker = new Worker(scriptUrl(POW_WORKER), { type: 'module' });
    state.worker = worker;
    $('pow').hidden = false;
    $('pow-progress').value = 0;
    worker.onmessage = (e) => {
      if (e.data.progress !== undefined) {
        // Expected work is 2^bits; the bar approaches the end without claiming to know it.
        $('pow-progress').value = 1 - Math.exp(-e.data.progress / expected);
      } else {
        $('pow-progress').value = 1;
        worker.terminate();
        state.worker = null;
        resolve(e.data.counter);
      }
    };
    worker.onerror = (e) => {
      worker.terminate();
      state.worker = null;
      reject(e);
    };
    worker.postMessage({ token, roomId, bits });
  });
}

function cancelPow() {
  state.worker?.terminate();
  state.worker = null;
  state.stopped = true;
  state.ws?.close();
  $('pow').hidden = true;
  $('new-room').disabled = false;
  setStatus('idle', 'Not connected');
}

// ---- connection ------------------------------------------------------------------------

function connect() {
  state.stopped = false;
  setStatus(state.everJoined ? 'reconnecting' : 'connecting', state.everJoined ? 'Reconnecting…' : 'Connecting…');
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.onmessage = (e) => {
    clearTimeout(state.answerTimer);
    state.answerTimer = null;
    state.lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(e.data);
    } catch {
      return;
    }
    // One frame at a time, in arrival order: decryption is asynchronous, and the replay rule
    // and the seq bookkeeping assume frames are handled in the order the server sent them.
    state.chain = state.chain.then(() => handle(frame)).catch((err) => console.error(err));
  };
  ws.onclose = () => lost(ws);
}

/** The socket closed (or was given up): reconnect after a growing, jittered wait. */
function lost(ws) {
  if (state.ws !== ws) return;
  clearTimeout(state.answerTimer);
  state.answerTimer = null;
  state.joined = false;
  state.historyFilling = false;
  state.flushAfterFill = false;
  state.fillPause = 0;
  if ([...state.pending.values()].some((p) => p.unanswered)) state.unsure = true;
  // Refused sends are still pending: the next join sends them with the rest.
  clearTimeout(state.resendTimer);
  state.resendTimer = null;
  state.refused = [];
  if (state.stopped) return;
  const wait = state.backoff + Math.random() * 250;
  state.backoff = Math.min(state.backoff * 2, 15000);
  setStatus('reconnecting', `Connection lost; reconnecting in ${Math.ceil(wait / 1000)} s…`);
  setTimeout(() => {
    if (!state.stopped) connect();
  }, wait);
}

/**
 * A socket can die without closing: a laptop that slept, a phone that changed networks, a
 * path that drops everything. The browser learns of it only when TCP gives up, many minutes
 * later, and meanwhile the page would look connected and show nothing new. So the page gives
 * a socket that owes it an answer (an ack, or the probe below) a few seconds; if nothing at all
 * arrives, it drops that socket and reconnects, catching up on what it missed and sending
 * again what was not acknowledged.
 */
function expectAnswer(ms) {
  if (state.answerTimer) return; // an earlier deadline stands
  const ws = state.ws;
  state.answerTimer = setTimeout(() => {
    state.answerTimer = null;
    if (state.ws !== ws) return;
    ws.onmessage = null;
    ws.onclose = null;
    ws.close();
    lost(ws);
  }, ms);
}

/** When the page comes back into view or the network returns: ask a quiet socket for
 * anything missed, which also proves it alive. */
function checkAlive() {
  const now = Date.now();
  if (!state.joined || state.ws?.readyState !== WebSocket.OPEN || state.historyFilling) return;
  if (now - state.lastFrameAt < QUIET_MS || now - state.lastProbeAt < QUIET_MS) return;
  state.lastProbeAt = now;
  state.historyFilling = true;
  state.fillMode = 'after';
  requestAfter();
  expectAnswer(ANSWER_MS.probe);
}

async function handle(frame) {
  switch (frame.type) {
    case 'hello':
      if (Number.isSafeInteger(frame.now) && frame.now > 0) {
        state.clockOffset = frame.now - Date.now();
      }
      state.maxCt = frame.max_ct;
      state.powBits = frame.pow_bits;
      state.challenge = fromB64u(frame.challenge);
      if (state.mode === 'create') await create(frame.pow_bits);
      else await join();
      break;
    case 'pow': {
      const counter = await solvePow(fromB64u(frame.token), state.keys.roomId, frame.bits);
      $('pow').hidden = true;
      state.ws.send(JSON.stringify({
        type: 'create',
        room: b64u(state.keys.roomId),
        auth_key: b64u(state.keys.authKey),
        pow: { token: frame.token, counter },
      }));
      break;
    }
    case 'joined':
      onJoined(frame);
      break;
    case 'msg':
      await receive([frame], 'new');
      break;
    case 'history':
      if (state.historyFilling && state.fillMode === 'measure') {
        // Far behind: the newest page instead of everything missed, which would be read,
        // decrypted and then forgotten (the page keeps about KEEP_SHOWN).
        const newest = frame.messages.at(-1)?.seq ?? state.lastSeq;
        state.fillMode = newest - state.lastSeq > KEEP_SHOWN ? 'jump' : 'after';
        requestFill();
      } else if (state.historyFilling) {
        await receive(frame.messages, 'new');
        if (state.fillMode === 'jump' && frame.messages.length > 0) {
          forgetBefore(frame.messages[0].seq);
          toEnd();
          // What went unseen and is no longer shown is not counted as unread either.
          state.unread = Math.min(state.unread, frame.messages.length);
          showUnread();
        }
        if (frame.more && state.fillMode === 'after') {
          // Paced once the server refused one: asking at once would only be refused again,
          // and each refusal is a strike against the socket.
          if (state.fillPause > 0) requestFillWait(state.fillPause);
          else requestAfter();
        } else {
          state.historyFilling = false;
          state.fillPause = 0;
          if (state.fillMode === 'after') state.unsure = false;
          if (state.flushAfterFill) {
            state.flushAfterFill = false;
            await flushPending();
          }
        }
      } else {
        await receive(frame.messages, 'older', () => { $('older').hidden = !frame.more; });
      }
      break;
    case 'ack':
      state.pending.get(frame.ref)?.el.setAttribute('data-seq', frame.seq);
      state.highestStored = Math.max(state.highestStored, state.pending.get(frame.ref)?.n ?? 0);
      state.seen.add(frame.seq);
      state.lastSeq = Math.max(state.lastSeq, frame.seq);
      markPending(frame.ref, 'sent', frame.ts);
      state.pending.delete(frame.ref);
      break;
    case 'nuked':
      wiped();
      break;
    case 'error':
      onError(frame);
      break;
    default:
      break;
  }
}

async function create(powBits) {
  const frame = { type: 'create', room: b64u(state.keys.roomId), auth_key: b64u(state.keys.authKey) };
  if (powBits > 0) {
    state.ws.send(JSON.stringify({ type: 'pow' }));
  } else {
    state.ws.send(JSON.stringify(frame));
  }
}

async function join() {
  const proof = await joinProof(state.keys.authKey, state.challenge, state.keys.roomId);
  const frame = { type: 'join', room: b64u(state.keys.roomId), proof: b64u(proof) };
  // Back after a lost connection: everything after the last message seen (all of them, if
  // none was), not the newest page, which would leave a gap.
  if (state.everJoined) frame.after = state.lastSeq;
  state.ws.send(JSON.stringify(frame));
}

/** Ask for the next part of the catch-up after `ms`, if this socket is still catching up then. */
function requestFillWait(ms) {
  const ws = state.ws;
  setTimeout(() => {
    if (state.ws === ws && state.historyFilling && state.joined) requestFill();
  }, ms);
}

function requestAfter() {
  state.ws.send(JSON.stringify({ type: 'history', after: state.lastSeq, limit: 200 }));
}

/**
 * Ask for the next part of a catch-up, by its mode: 'after' pages on from the last seq shown;
 * 'measure' asks for the newest message only, to learn how far behind the page is; 'jump'
 * asks for the newest page, to be shown instead of everything missed.
 */
function requestFill() {
  if (state.fillMode === 'after') requestAfter();
  else state.ws.send(JSON.stringify({ type: 'history', limit: state.fillMode === 'measure' ? 1 : 200 }));
}

function onJoined(frame) {
  const resumed = state.everJoined;
  state.joined = true;
  state.everJoined = true;
  state.mode = 'join';
  state.backoff = 500;
  notice('');
  if (!location.hash || location.hash.slice(1) !== b64u(state.keys.secret)) {
    // The secret lives only in the fragment, which browsers never send to a server.
    history.replaceState(null, '', `#${b64u(state.keys.secret)}`);
  }
  $('link').value = location.href;
  show('room');
  setStatus('online', 'Connected');
  $('pow').hidden = true;
  (async () => {
    if (resumed) {
      await receive(frame.messages, 'new');
      if (frame.more) {
        // Anything pending goes once the rest of what was missed is in. Far behind, the page
        // may skip to the newest page - unless a send's fate is unknown: only reading what
        // was stored since tells whether it was, and which counter comes next.
        state.historyFilling = true;
        state.flushAfterFill = true;
        state.fillMode = state.unsure ? 'after' : 'measure';
        requestFill();
        return;
      }
      state.unsure = false;
    } else {
      await receive(frame.messages, 'shown', () => { $('older').hidden = !frame.more; });
    }
    await flushPending();
  })();
  if (!resumed) $('text').focus();
}

function onError(frame) {
  const text = ERRORS[frame.code] ?? ERRORS.internal;
  if (!frame.ref && state.historyFilling) {
    // A catch-up page refused for now is asked for again when the server says; anything else
    // ends the catch-up (what is pending then waits for the next join).
    if (frame.code === 'rate_limited') {
      const wait = Math.min(Math.max(frame.retry_after_ms ?? 1000, 100), 30_000);
      state.fillPause = Math.min(state.fillPause + wait, 30_000);
      requestFillWait(wait);
      return;
    }
    state.historyFilling = false;
    state.flushAfterFill = false;
  }
  if (frame.ref && frame.code === 'replay' && !state.pending.has(frame.ref)) return; // settled already
  if (frame.ref && state.pending.has(frame.ref)) {
    const p = state.pending.get(frame.ref);
    p.unanswered = false;
    if (frame.code === 'replay') {
      markPending(frame.ref, 'sent');
      state.pending.delete(frame.ref);
    } else if (AUTO_RESEND.has(frame.code) && p.retries < AUTO_RESENDS) {
      // Refused for now, not for good: it goes again by itself when the server said, or
      // after a doubling wait; only after several refusals does it need a click.
      p.retries += 1;
      later(frame.ref, frame.retry_after_ms ?? 1000 * 2 ** p.retries);
    } else {
      markPending(frame.ref, 'failed', text);
    }
    return;
  }
  switch (frame.code) {
    case 'room_gone':
      wiped();
      break;
    case 'auth_failed':
      state.stopped = true;
      state.ws?.close();
      setStatus('idle', 'Not connected');
      notice(text);
      break;
    case 'pow_invalid':
    case 'room_exists':
      // Start over with a fresh room.
      state.stopped = true;
      state.ws?.close();
      $('new-room').disabled = false;
      $('pow').hidden = true;
      notice(text);
      break;
    case 'pow_required':
      // The work asked for rose between `hello` and our `create`: ask for a token and do it.
      if (state.mode === 'create' && !state.joined) state.ws.send(JSON.stringify({ type: 'pow' }));
      notice(text);
      break;
    case 'rate_limited':
      if (!state.joined) {
        // The join or the creation itself was refused for now (on a busy onion service all
        // visitors share one budget): try again on this socket when the server says.
        const ws = state.ws;
        setTimeout(() => {
          if (state.ws !== ws || state.joined || ws.readyState !== WebSocket.OPEN) return;
          if (state.mode === 'create') create(state.powBits);
          else join();
        }, Math.min(Math.max(frame.retry_after_ms ?? 1000, 100), 30_000));
      }
      notice(text);
      break;
    default:
      notice(text);
  }
}

function wiped() {
  state.stopped = true;
  state.joined = false;
  state.ws?.close();
  state.pending.clear();
  $('messages').replaceChildren();
  forgetRoom();
  history.replaceState(null, '', '/');
  setStatus('idle', 'Room wiped');
  show('gone');
}

async function openRoom(secret, mode) {
  state.keys = await RoomKeys.derive(secret);
  state.session = new RoomSession(state.keys);
  state.session.adopt(earlierSessions());
  state.mode = mode;
  connect();
}

// ---- wiring ----------------------------------------------------------------------------

function init() {
  if (!window.isSecureContext || !globalThis.crypto?.subtle) {
    // Browsers offer WebCrypto only to secure pages: over plain http nothing here would work.
    show('landing');
    $('new-room').disabled = true;
    notice('This page has to be opened with https:// (or as an .onion address in Tor Browser): '
      + 'browsers let a page encrypt only there. Ask for the https:// address of this server.');
    return;
  }
  $('nick').value = localStorage.getItem('nanochat.nick') ?? '';
  $('nick').addEventListener('change', () => localStorage.setItem('nanochat.nick', $('nick').value.trim()));
  $('new-room').addEventListener('click', () => {
    $('new-room').disabled = true;
    notice('');
    openRoom(randomBytes(32), 'create');
  });
  $('pow-cancel').addEventListener('click', cancelPow);
  $('notify').addEventListener('click', toggleNotify);
  answerNotifyWorker();
  $('show-qr').addEventListener('click', toggleQr);
  $('copy-link').addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText($('link').value);
      $('copy-link').textContent = 'Copied';
      setTimeout(() => { $('copy-link').textContent = 'Copy link'; }, 2000);
    } catch {
      $('link').select();
    }
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('text').value;
    const over = state.session && state.maxCt > 0
      ? state.session.sealedLength(nick(), text, serverNow()) - state.maxCt : 0;
    if (over > 0) {
      // Refused here, before it is sent: the text stays in the box to be shortened.
      notice(`${ERRORS.too_large} Shorten it by ${over} characters.`);
      state.tooLong = true;
      return;
    }
    if (state.tooLong) notice('');
    state.tooLong = false;
    $('text').value = '';
    sendText(text);
  });
  $('text').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('older').addEventListener('click', () => {
    // Not while catching up: its pages and an older one would be told apart only by order.
    if (state.joined && state.firstSeq !== null && !state.historyFilling) {
      state.ws.send(JSON.stringify({ type: 'history', before: state.firstSeq, limit: 50 }));
    }
  });
  $('panic').addEventListener('click', () => $('panic-dialog').showModal());
  $('panic-dialog').addEventListener('close', () => {
    if ($('panic-dialog').returnValue === 'wipe' && state.joined) {
      state.ws.send(JSON.stringify({ type: 'panic' }));
    }
  });
  // A reader at the end stays there when the conversation's box shrinks (a phone's keyboard
  // opening, a window made smaller): without this the newest lines would slide out of view.
  // A scroll that comes with a change of the box's height (before the observer has seen it)
  // says nothing about where the reader was: the observer decides then.
  let following = true;
  let height = $('scroller').clientHeight;
  $('scroller').addEventListener('scroll', () => {
    if ($('scroller').clientHeight !== height) return;
    following = atEnd();
    if (following) $('jump').hidden = true;
  }, { passive: true });
  new ResizeObserver(() => {
    height = $('scroller').clientHeight;
    if (following) toEnd();
  }).observe($('scroller'));
  $('jump').addEventListener('click', toEnd);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      state.unread = 0;
      showUnread();
      checkAlive();
    }
  });
  window.addEventListener('online', checkAlive);
  window.addEventListener('pageshow', (e) => {
    if (e.persisted) checkAlive();
  });
  window.addEventListener('hashchange', () => location.reload());

  const fragment = location.hash.slice(1);
  if (fragment) {
    let secret = null;
    try {
      secret = fromB64u(fragment);
    } catch {
      secret = null;
    }
    if (!secret || secret.length !== 32) {
      show('landing');
      notice('This link is incomplete: the part after # should be 43 characters. Ask for the link again.');
      return;
    }
    show('room');
    openRoom(secret, 'join');
  } else {
    show('landing');
  }
}

init();

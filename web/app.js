/* EchoTune web client: sign in, see recommendations and trending with their reasons, and send
 * play / like / skip feedback that survives being offline (see queue.js). */
'use strict';

const APP_BASE = new URL('./', location.href);
const API_BASE = new URL('../', APP_BASE);  // the ingress root: this page is served under <root>/app/
const SYNC_TAG = 'echotune-outbox';
const RECS_K = 10;
const TRENDING_K = 10;
const Q = self.EchoQueue;

const REASONS = {
  cf: 'Listeners with your taste play this',
  content: 'Sounds like tracks you played',
  trending: 'Trending now',
  popular: 'Popular with everyone',
  diversity_demoted: 'Moved down for variety',
};
const reasonFor = (source) => REASONS[source] || source.replace(/_/g, ' ');

const $ = (id) => document.getElementById(id);
let session = null;

function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.classList.add('show');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove('show'), 2500);
}

function authHeaders() {
  return { Authorization: `Bearer ${session.api_key}` };
}

async function getJson(path) {
  const resp = await fetch(new URL(path, API_BASE), { headers: authHeaders() });
  if (!resp.ok) {
    const error = new Error(`${resp.status} ${resp.statusText}`);
    error.status = resp.status;
    throw error;
  }
  return resp.json();
}

/* ---------- offline-aware lists: the last good answer is kept for offline reloads ---------- */

function remember(name, body) {
  localStorage.setItem(`echotune.${name}.${session.user_id}`, JSON.stringify({ at: Date.now(), body }));
}

function recall(name) {
  const raw = localStorage.getItem(`echotune.${name}.${session.user_id}`);
  return raw ? JSON.parse(raw) : null;
}

async function loadList(name, path, render, note) {
  try {
    const body = await getJson(path);
    remember(name, body);
    render(body);
    note.textContent = '';
  } catch (err) {
    if (err.status === 401 || err.status === 403) return signedOut('Your key expired or was revoked: sign in again.');
    const kept = recall(name);
    if (kept) {
      render(kept.body);
      note.textContent = `offline copy from ${new Date(kept.at).toLocaleTimeString()}`;
    } else {
      note.textContent = err.status === 404 ? 'not available yet' : 'unavailable offline';
    }
  }
}

function trackItem(track, reasons, context) {
  const li = document.createElement('li');
  li.className = 'track';
  li.dataset.trackId = track.track_id;
  const title = document.createElement('span');
  title.className = 'title';
  title.textContent = track.track_id;
  const meta = document.createElement('span');
  meta.className = 'meta';
  meta.textContent = [track.artist_id, track.genre].filter(Boolean).join(' · ');
  const actions = document.createElement('span');
  actions.className = 'actions';
  for (const [type, label, glyph] of [['play', 'Play', '▶'], ['like', 'Like', '♥'], ['skip', 'Skip', '»']]) {
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.type = type;
    button.title = label;
    button.setAttribute('aria-label', `${label} ${track.track_id}`);
    button.textContent = glyph;
    button.addEventListener('click', () => feedback(type, track, context, button));
    actions.append(button);
  }
  const chips = document.createElement('span');
  chips.className = 'reasons';
  for (const reason of reasons) {
    const chip = document.createElement('span');
    chip.className = 'reason';
    chip.textContent = reason;
    chips.append(chip);
  }
  li.append(title, actions, meta, chips);
  return li;
}

function renderRecs(body) {
  const list = $('recs');
  list.replaceChildren(...body.items.map((t, i) => trackItem(
    t,
    (t.sources || []).map(reasonFor).concat(body.cold_start ? ['New here: popular picks'] : []),
    { recommendation_id: body.request_id, position: i },
  )));
}

function trendReason(t) {
  if (t.observed && t.expected) return `${Math.round(t.observed)} plays today, ${(t.observed / t.expected).toFixed(1)}× usual`;
  if (t.velocity) return `Rising ${t.velocity.toFixed(1)}× faster than usual`;
  return 'Trending now';
}

function renderTrending(body) {
  $('trending').replaceChildren(...(body.items || []).map((t, i) => trackItem(t, [trendReason(t)], { position: i })));
}

function loadAll() {
  const user = encodeURIComponent(session.user_id);
  return Promise.all([
    loadList('recs', `v1/users/${user}/recommendations?k=${RECS_K}`, renderRecs, $('recs-note')),
    loadList('trending', `v1/trending?k=${TRENDING_K}`, renderTrending, $('trending-note')),
  ]);
}

/* ---------- feedback: always through the outbox, so nothing is lost offline ---------- */

async function feedback(type, track, context, button) {
  const event = {
    event_id: crypto.randomUUID(),
    user_id: session.user_id,
    track_id: track.track_id,
    event_type: type,
    timestamp: new Date().toISOString(),
    device_type: 'web',
    locale: navigator.language,
    ...context,
  };
  if (event.recommendation_id === undefined) delete event.recommendation_id;
  await Q.enqueue(event, session.api_key);
  button.classList.add('done');
  // Before flushing, not after a failure: should the tab close while the POST is in flight,
  // the service worker still sends the event. A sync that finds the queue empty is harmless.
  await requestSync();
  const result = await flush();
  toast(result.state === 'empty' || result.state === 'held' ? `${type} sent` : `${type} saved: sends when you are back online`);
}

async function flush() {
  const result = await Q.flush(API_BASE);
  if (result.state === 'offline' || result.state === 'busy') await requestSync();
  if (result.state === 'auth' && session) toast('Sign in again to send your queued feedback');
  await showOutbox();
  return result;
}

async function requestSync() {
  const reg = await navigator.serviceWorker?.getRegistration();
  if (reg && 'sync' in reg) {
    try { await reg.sync.register(SYNC_TAG); } catch (err) { /* no permission: the online event covers it */ }
  }
}

async function showOutbox() {
  const s = await Q.stats();
  const el = $('outbox');
  el.textContent = `outbox: ${s.size}` + (s.dropped ? ` · dropped ${s.dropped}` : '') + (s.rejected ? ` · rejected ${s.rejected}` : '');
  el.title = `Feedback waiting to be sent (keeps the newest ${s.limit})`;
  el.dataset.size = s.size;
  el.dataset.dropped = s.dropped;
  el.classList.toggle('pending', s.size > 0);
}

function showNetwork() {
  const el = $('network');
  el.textContent = navigator.onLine ? 'online' : 'offline';
  el.classList.toggle('offline', !navigator.onLine);
}

/* ---------- session ---------- */

async function signIn(userId, apiKey) {
  if (!apiKey) {
    const resp = await fetch(new URL('v1/web/sign-in', API_BASE), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user_id: userId }),
    });
    if (!resp.ok) throw new Error(resp.status === 404 ? 'demo sign-in is off: paste an API key' : `sign-in failed (${resp.status})`);
    const body = await resp.json();
    apiKey = body.api_key;
  }
  session = { user_id: userId, api_key: apiKey };
  localStorage.setItem('echotune.session', JSON.stringify(session));
  await Q.setMeta('session', session);  // the service worker replays the outbox with it
  showSession();
  await loadAll();
  await flush();
}

/* Sign-out: feedback already queued keeps the key it was made under (queue.js) and is sent
 * now if we are online, else later by the service worker; this device stops receiving the
 * listener's notifications. */
async function signOut() {
  const leaving = session;
  try {
    if (navigator.onLine) await flush();
    await leavePush(leaving);
  } finally {
    await signedOut();
  }
}

async function signedOut(message) {
  session = null;
  localStorage.removeItem('echotune.session');
  await Q.setMeta('session', null);  // nothing is sent with this key for a next listener
  showSession();
  $('signin-status').textContent = message || '';
}

function showSession() {
  $('signin').hidden = !!session;
  $('session').hidden = !session;
  $('lists').hidden = !session;
  document.body.dataset.signedIn = session ? 'yes' : 'no';
  if (session) $('who').textContent = session.user_id;
}

/* ---------- push ---------- */

function applicationServerKey(b64) {
  const raw = atob(b64.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

async function enableNotifications() {
  const status = $('notify-status');
  try {
    if (!('PushManager' in self)) throw new Error('this browser has no web push');
    if ((await Notification.requestPermission()) !== 'granted') throw new Error('notifications are blocked');
    const { public_key: key } = await getJson('v1/push/vapid-public-key');
    const reg = await navigator.serviceWorker.ready;
    const subscription = await reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: applicationServerKey(key) });
    const kept = recall('recs');
    const genres = [...new Set((kept ? kept.body.items : []).map((t) => t.genre).filter(Boolean))].slice(0, 5);
    const resp = await fetch(new URL('v1/push/subscriptions', API_BASE), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...authHeaders() },
      body: JSON.stringify({
        user_id: session.user_id,
        subscription: subscription.toJSON(),
        timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC',
        genres,
      }),
    });
    if (!resp.ok) throw new Error(`subscription refused (${resp.status})`);
    status.textContent = `We will tell you about new trends in ${genres.join(', ') || 'your genres'}.`;
  } catch (err) {
    status.textContent = `Notifications unavailable: ${err.message}`;
  }
}

/* The browser's subscription belongs to the listener leaving: unsubscribe it (its push service
 * then answers 410 and the notifier prunes it) and tell the server at once. Best effort: an
 * offline sign-out must still sign out. */
async function leavePush(leaving) {
  const reg = await navigator.serviceWorker?.getRegistration();
  const subscription = await reg?.pushManager?.getSubscription().catch(() => null);
  if (!subscription) return;
  const endpoint = subscription.endpoint;
  await subscription.unsubscribe().catch(() => false);
  await fetch(new URL('v1/push/subscriptions', API_BASE), {
    method: 'DELETE',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${leaving.api_key}` },
    body: JSON.stringify({ user_id: leaving.user_id, endpoint }),
  }).catch(() => undefined);
}

/* ---------- start ---------- */

async function start() {
  showNetwork();
  window.addEventListener('online', () => { showNetwork(); flush(); if (session) loadAll(); });
  window.addEventListener('offline', showNetwork);
  new BroadcastChannel(Q.CHANNEL).onmessage = showOutbox;
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('sw.js').catch((err) => console.warn('service worker not registered', err));
  }
  $('signin-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    $('signin-status').textContent = 'signing in…';
    try {
      await signIn($('user-id').value.trim(), $('api-key').value.trim());
      $('signin-status').textContent = '';
    } catch (err) {
      $('signin-status').textContent = err.message;
    }
  });
  $('refresh').addEventListener('click', loadAll);
  $('signout').addEventListener('click', signOut);
  $('notify').addEventListener('click', enableNotifications);
  session = JSON.parse(localStorage.getItem('echotune.session') || 'null');
  showSession();
  await showOutbox();
  if (session) {
    await loadAll();
    await flush();
  }
  document.body.dataset.ready = 'yes';
}

start();

/* EchoTune's offline outbox: feedback events wait in IndexedDB until the gateway has them.
 *
 * Loaded by the page (<script src="queue.js">) and by the service worker (importScripts), so
 * both replay the same queue. Every event carries its event_id from the moment it is made,
 * so a replay that races another replay (Background Sync and the `online` event, two tabs)
 * is stored once by the gateway. The queue is bounded: beyond LIMIT the oldest events are
 * dropped and counted, and the count is shown to the listener. Each event keeps the API key it
 * was made under, so events left queued at sign-out are sent with their listener's key, never
 * with the next listener's.
 */
(function (root) {
  'use strict';
  const DB_NAME = 'echotune';
  const DB_VERSION = 1;
  const LIMIT = 200;        // events kept while offline; the oldest go first
  const BATCH = 100;        // events per POST (the gateway takes up to 1,000)
  const CHANNEL = 'echotune-queue';

  let dbPromise = null;
  function openDb() {
    if (!dbPromise) {
      dbPromise = new Promise((resolve, reject) => {
        const req = indexedDB.open(DB_NAME, DB_VERSION);
        req.onupgradeneeded = () => {
          const db = req.result;
          db.createObjectStore('outbox', { keyPath: 'seq', autoIncrement: true });
          db.createObjectStore('meta');
        };
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
    }
    return dbPromise;
  }

  function done(tx) {
    return new Promise((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = tx.onabort = () => reject(tx.error);
    });
  }

  function request(req) {
    return new Promise((resolve, reject) => {
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }

  async function getMeta(key, fallback = null) {
    const db = await openDb();
    const value = await request(db.transaction('meta').objectStore('meta').get(key));
    return value === undefined ? fallback : value;
  }

  async function setMeta(key, value) {
    const db = await openDb();
    const tx = db.transaction('meta', 'readwrite');
    tx.objectStore('meta').put(value, key);
    await done(tx);
  }

  function announce() {
    if (typeof BroadcastChannel !== 'undefined') {
      const ch = new BroadcastChannel(CHANNEL);
      ch.postMessage({ type: 'queue-changed' });
      ch.close();
    }
  }

  /* Add one event, made under `apiKey`; drop (and count) the oldest beyond LIMIT, in the same
   * transaction. */
  async function enqueue(event, apiKey) {
    const db = await openDb();
    const tx = db.transaction(['outbox', 'meta'], 'readwrite');
    const outbox = tx.objectStore('outbox');
    const meta = tx.objectStore('meta');
    outbox.add({ event, queued_at: Date.now(), api_key: apiKey || null });
    const size = await request(outbox.count());
    if (size > LIMIT) {
      let excess = size - LIMIT;
      const dropped = (await request(meta.get('dropped'))) || 0;
      meta.put(dropped + excess, 'dropped');
      const cursorReq = outbox.openCursor();
      await new Promise((resolve, reject) => {
        cursorReq.onsuccess = () => {
          const cursor = cursorReq.result;
          if (cursor && excess > 0) { cursor.delete(); excess -= 1; cursor.continue(); } else resolve();
        };
        cursorReq.onerror = () => reject(cursorReq.error);
      });
    }
    await done(tx);
    announce();
    return stats();
  }

  async function stats() {
    const db = await openDb();
    const tx = db.transaction(['outbox', 'meta']);
    const [size, dropped, rejected] = await Promise.all([
      request(tx.objectStore('outbox').count()),
      request(tx.objectStore('meta').get('dropped')),
      request(tx.objectStore('meta').get('rejected')),
    ]);
    return { size, dropped: dropped || 0, rejected: rejected || 0, limit: LIMIT };
  }

  async function queued() {
    const db = await openDb();
    return request(db.transaction('outbox').objectStore('outbox').getAll());  // at most LIMIT
  }

  async function remove(seqs, rejected = 0) {
    const db = await openDb();
    const tx = db.transaction(['outbox', 'meta'], 'readwrite');
    for (const seq of seqs) tx.objectStore('outbox').delete(seq);
    if (rejected) {
      const meta = tx.objectStore('meta');
      meta.put(((await request(meta.get('rejected'))) || 0) + rejected, 'rejected');
    }
    await done(tx);
    announce();
  }

  async function post(apiBase, apiKey, events) {
    return fetch(new URL('v1/events', apiBase), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${apiKey}` },
      body: JSON.stringify({ events }),
    });
  }

  /* The key an event is sent with: the signed-in listener's current key for their own events
   * (signing in again replaces an expired one), else the key it was queued under. Events queued
   * before keys were kept with them go with the current key, as they always did. */
  function keyFor(record, session) {
    if (session && (record.event.user_id === session.user_id || !record.api_key)) return session.api_key;
    return record.api_key || null;
  }

  /* A device clock running fast stamps events "in the future", beyond what the gateway allows:
   * the event restamped by the gap between the server's Date header and this clock, or null
   * when the 422 was for something else. */
  async function restamped(resp, event) {
    let detail = null;
    try { detail = (await resp.json()).detail; } catch (err) { return null; }
    const future = Array.isArray(detail) && detail.some((e) => Array.isArray(e.loc) && e.loc[e.loc.length - 1] === 'timestamp' && /future/.test(e.msg));
    const serverNow = Date.parse(resp.headers.get('Date'));
    if (!future || Number.isNaN(serverNow)) return null;
    return { ...event, timestamp: new Date(Date.parse(event.timestamp) + serverNow - Date.now()).toISOString() };
  }

  /* Send what is queued, oldest first, one key's events per POST. Resolves to {sent, state};
   * state is 'empty' when the queue drained, 'offline' (network error), 'auth' (the signed-in
   * key, or with no one signed in every key, expired or was revoked: sign in again), 'held'
   * (only events of listeners who signed out are left, and their keys no longer work: they
   * wait for that listener to sign in here again) or 'busy' (429/5xx: try later). Nothing
   * leaves the queue before the gateway answered. */
  async function flushOnce(apiBase) {
    let sent = 0;
    const refused = new Set();  // keys the gateway answered 401/403 to in this flush
    for (;;) {
      const session = await getMeta('session');
      const records = await queued();
      const ready = records.map((r) => ({ ...r, key: keyFor(r, session) })).filter((r) => r.key && !refused.has(r.key));
      if (!ready.length) {
        if (!records.length) return { sent, state: 'empty' };
        return { sent, state: !session || refused.has(session.api_key) ? 'auth' : 'held' };
      }
      const key = ready[0].key;
      const batch = ready.filter((r) => r.key === key).slice(0, BATCH);
      let resp;
      try {
        resp = await post(apiBase, key, batch.map((r) => r.event));
      } catch (err) {
        return { sent, state: 'offline' };
      }
      if (resp.ok) {
        const body = await resp.json();
        const rejected = body.results.filter((r) => r.status === 'rejected').length;
        await remove(batch.map((r) => r.seq), rejected);
        sent += body.accepted + body.duplicates;
      } else if (resp.status === 422) {
        // A malformed event would block the queue for ever: send one by one, keep the good.
        for (const record of batch) {
          let one;
          try {
            one = await post(apiBase, key, [record.event]);
            const fixed = one.status === 422 ? await restamped(one, record.event) : null;
            if (fixed) one = await post(apiBase, key, [fixed]);  // once: a second 422 drops it
          } catch (err) { return { sent, state: 'offline' }; }
          if (one.ok) { sent += 1; await remove([record.seq]); } else if (one.status === 422) await remove([record.seq], 1);
          else if (one.status === 401 || one.status === 403) { refused.add(key); break; }
          else return { sent, state: 'busy' };
        }
      } else if (resp.status === 401 || resp.status === 403) {
        refused.add(key);
      } else {
        return { sent, state: 'busy' };
      }
    }
  }

  /* One flush at a time per origin (page tabs and service worker share the lock). */
  function flush(apiBase) {
    const locks = root.navigator && root.navigator.locks;
    return locks ? locks.request('echotune-outbox', () => flushOnce(apiBase)) : flushOnce(apiBase);
  }

  root.EchoQueue = { enqueue, flush, stats, getMeta, setMeta, LIMIT, CHANNEL };
})(self);

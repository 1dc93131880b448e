/* EchoTune service worker: caches the app shell, replays the offline outbox on Background
 * Sync, and shows "new trending" push notifications. */
'use strict';
importScripts('queue.js');

const SHELL_CACHE = 'echotune-shell-v1';
const SHELL = ['./', 'index.html', 'app.js', 'queue.js', 'style.css', 'manifest.webmanifest', 'icon.svg'];
const SCOPE = new URL(self.registration.scope);
const API_BASE = new URL('../', SCOPE);  // the ingress root: /app/ sits one level below it
const SYNC_TAG = 'echotune-outbox';

/* 'reload' and 'no-cache' below: the shell must come from the server, never from the browser's
 * HTTP cache, which may still hold the previous deploy's files. */
self.addEventListener('install', (event) => {
  const fresh = SHELL.map((path) => new Request(path, { cache: 'reload' }));
  event.waitUntil(caches.open(SHELL_CACHE).then((cache) => cache.addAll(fresh)).then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name !== SHELL_CACHE) await caches.delete(name);
    await self.clients.claim();
  })());
});

/* The shell: answer from the cache at once (works offline), refresh the cache behind it.
 * API calls are left to the network; the page keeps its own copy of the last answers. */
self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== SCOPE.origin || !url.pathname.startsWith(SCOPE.pathname)) return;
  event.respondWith((async () => {
    const cache = await caches.open(SHELL_CACHE);
    const cached = await cache.match(event.request, { ignoreSearch: true });
    const fresh = fetch(event.request, { cache: 'no-cache' }).then((resp) => {
      if (resp.ok) cache.put(event.request, resp.clone());
      return resp;
    });
    if (cached) {
      event.waitUntil(fresh.catch(() => undefined));
      return cached;
    }
    return fresh;
  })());
});

self.addEventListener('sync', (event) => {
  if (event.tag !== SYNC_TAG) return;
  event.waitUntil(self.EchoQueue.flush(API_BASE).then((result) => {
    // Rejecting asks the browser to retry the sync later (with its own back-off).
    if (result.state === 'offline' || result.state === 'busy') throw new Error(`outbox not drained: ${result.state}`);
  }));
});

self.addEventListener('push', (event) => {
  let message = { title: 'EchoTune', body: 'Something new is trending.' };
  try { message = event.data ? event.data.json() : message; } catch (err) { message.body = event.data.text(); }
  event.waitUntil(self.registration.showNotification(message.title, {
    body: message.body,
    tag: message.type || 'echotune',
    icon: 'icon.svg',
    data: { url: SCOPE.href, tracks: message.tracks || [] },
  }));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: 'window' });
    const open = windows.find((w) => w.url.startsWith(SCOPE.href));
    return open ? open.focus() : self.clients.openWindow(event.notification.data.url);
  })());
});

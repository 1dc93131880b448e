"""The PWA in real headless Chromium against the real Serve app and Redis: the service worker
registers and caches the shell (and takes a new deploy's past the HTTP cache), feedback made
offline or in flight when the tab closes is replayed exactly once, a reload while offline
still shows the last recommendations, the offline queue is bounded, sign-out leaves nothing
sent with the next listener's key."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import redis

from tests.waiting import poll
from tests.web_support import PREFIX, OldStyleShellServer, launch_chromium

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module."""
    with playwright_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def web(web_app, browser):
    """The shared Serve app plus the module's Chromium."""
    return {"settings": web_app["settings"], "url": f"{web_app['base']}/app/", "browser": browser}


@pytest.fixture
def page(web):
    """A fresh browser profile, signed in (demo sign-in) as a new listener, controlled by the
    service worker."""
    context = web["browser"].new_context()
    page = context.new_page()
    user = f"web-{uuid.uuid4().hex[:8]}"
    page.goto(web["url"])
    page.fill("#user-id", user)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#recs li.track")
    page.wait_for_function("navigator.serviceWorker.controller !== null")
    page.user_id = user
    yield page
    context.close()


def stored_events(settings, user_id: str) -> list[dict]:
    """The events of one listener in the gateway's Redis Stream."""
    from app.events.stream import decode_entry

    client = redis.Redis.from_url(settings.redis.url)
    entries = [decode_entry(i, f) for i, f in client.xrange(settings.redis.stream_key)]
    return [e.event for e in entries if e.event and e.event["user_id"] == user_id]


def outbox_size(page) -> int:
    return int(page.get_attribute("#outbox", "data-size"))


def test_service_worker_registers_and_caches_the_app_shell(page):
    state = page.evaluate("navigator.serviceWorker.ready.then(r => r.active.state)")
    assert state == "activated"
    cached = page.evaluate("caches.open('echotune-shell-v1').then(c => c.keys()).then(ks => ks.map(r => new URL(r.url).pathname))")
    assert {f"{PREFIX}/app/index.html", f"{PREFIX}/app/app.js", f"{PREFIX}/app/queue.js"} <= set(cached)
    manifest = page.evaluate("fetch('manifest.webmanifest').then(r => r.json())")
    assert manifest["display"] == "standalone" and manifest["icons"]


def test_recommendations_and_trending_show_their_reasons(page):
    recs = page.locator("#recs li.track")
    assert recs.count() == 10
    assert "Popular with everyone" in recs.first.inner_text()
    trending = page.locator("#trending li.track")
    page.wait_for_selector("#trending li.track")
    assert trending.count() == 6
    assert "plays today" in trending.first.inner_text()
    if os.environ.get("ECHOTUNE_SCREENSHOT"):  # the README's picture: same browser, same app
        page.set_viewport_size({"width": 1100, "height": 760})
        page.screenshot(path=os.environ["ECHOTUNE_SCREENSHOT"])


def test_likes_made_offline_are_stored_exactly_once_when_back_online(web, page):
    settings = web["settings"]
    page.context.set_offline(True)
    page.wait_for_function("document.getElementById('network').textContent === 'offline'")
    liked = []
    for item in page.locator("#recs li.track").all()[:3]:
        liked.append(item.get_attribute("data-track-id"))
        item.locator("button[data-type=like]").click()
    page.wait_for_function("document.getElementById('outbox').dataset.size === '3'")
    assert stored_events(settings, page.user_id) == []

    page.context.set_offline(False)  # Background Sync and the `online` event both replay
    page.wait_for_function("document.getElementById('outbox').dataset.size === '0'", timeout=30_000)
    events = stored_events(settings, page.user_id)
    assert sorted(e["track_id"] for e in events) == sorted(liked)
    assert {e["event_type"] for e in events} == {"like"}
    assert len({e["event_id"] for e in events}) == 3


def test_reload_while_offline_still_shows_the_last_recommendations(page):
    shown = page.locator("#recs li.track").evaluate_all("els => els.map(e => e.dataset.trackId)")
    page.context.set_offline(True)
    response = page.reload()
    assert response.from_service_worker
    page.wait_for_selector("#recs li.track")
    assert page.locator("#recs li.track").evaluate_all("els => els.map(e => e.dataset.trackId)") == shown
    assert "offline copy" in page.inner_text("#recs-note")
    assert page.evaluate("fetch('../healthz').then(() => 'reached', () => 'offline')") == "offline"


def test_offline_queue_is_bounded_and_counts_what_it_dropped(page):
    page.context.set_offline(True)
    limit = page.evaluate("EchoQueue.LIMIT")
    page.evaluate(
        """async (n) => { for (let i = 0; i < n; i++) await EchoQueue.enqueue({event_id: crypto.randomUUID(),
           user_id: 'bounded', track_id: 't' + i, event_type: 'play', timestamp: new Date().toISOString()}); }""",
        limit + 5,
    )
    page.wait_for_function(f"document.getElementById('outbox').dataset.size === '{limit}'")
    assert page.get_attribute("#outbox", "data-dropped") == "5"
    assert "dropped 5" in page.inner_text("#outbox")
    first = page.evaluate(
        """new Promise(ok => { const r = indexedDB.open('echotune'); r.onsuccess = () =>
           r.result.transaction('outbox').objectStore('outbox').getAll(null, 1).onsuccess = e => ok(e.target.result[0].event.track_id); })"""
    )
    assert first == "t5"  # the five oldest were dropped, not the newest


def test_background_sync_replays_the_outbox_with_no_page_open(web, page):
    """The service worker's own replay: the page that queued the likes is gone, so no `online`
    handler runs; Chromium fires the sync event when the network returns (should it not, the
    test fires it through DevTools, as the browser would on its next retry)."""
    settings = web["settings"]
    cdp = page.context.new_cdp_session(page)
    registrations = []
    cdp.on("ServiceWorker.workerRegistrationUpdated", lambda e: registrations.extend(e["registrations"]))
    cdp.send("ServiceWorker.enable")
    page.context.set_offline(True)
    liked = [item.get_attribute("data-track-id") for item in page.locator("#recs li.track").all()[:2]]
    for track in liked:
        page.locator(f"#recs li[data-track-id='{track}'] button[data-type=like]").click()
    page.wait_for_function("document.getElementById('outbox').dataset.size === '2'")
    assert page.evaluate("navigator.serviceWorker.ready.then(r => r.sync.getTags())") == ["echotune-outbox"]
    page.goto("about:blank")
    assert stored_events(settings, page.user_id) == []
    page.context.set_offline(False)
    events = []
    for attempt in range(100):
        events = stored_events(settings, page.user_id)
        if len(events) >= 2:
            break
        if attempt == 30:
            registration = next(r for r in registrations if not r["isDeleted"])
            origin = web["url"].split(PREFIX)[0]
            cdp.send("ServiceWorker.dispatchSyncEvent", {"origin": origin, "registrationId": registration["registrationId"], "tag": "echotune-outbox", "lastChance": False})
        page.wait_for_timeout(100)
    assert sorted(e["track_id"] for e in events) == sorted(liked)


def test_app_files_are_revalidated_on_every_load(web_app):
    """`no-cache`: a new deploy's files reach the browser (and the service worker's refresh)
    at the next load, not when a heuristic cache lifetime runs out."""
    with httpx.Client(base_url=web_app["base"], timeout=30) as http:
        for path in ("/app/", "/app/index.html", "/app/app.js", "/app/queue.js", "/app/sw.js"):
            resp = http.get(path)
            assert resp.status_code == 200 and resp.headers["cache-control"] == "no-cache", path


def test_service_worker_takes_a_new_deploy_past_the_http_cache(browser):
    """Against a server that sends no Cache-Control (the browser's HTTP cache then keeps the
    files heuristically fresh), the shell cache still gets the server's current files."""
    server = OldStyleShellServer()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_function("navigator.serviceWorker.controller !== null")
        # The install fetched the shell from the server, not from what the page load cached.
        installs = [h for path, h in server.requests if path == "/app/queue.js" and "no-cache" in h.get("cache-control", "")]
        assert installs, server.requests

        new_app = server.files["/app/app.js"] + b"\n// release 2\n"
        server.deploy("/app/app.js", new_app)
        page.reload()  # answered from the shell cache; the worker refreshes it behind
        page.wait_for_function(
            "caches.open('echotune-shell-v1').then(c => c.match('app.js')).then(r => r.text()).then(t => t.includes('// release 2'))",
            timeout=30_000,
        )
    finally:
        context.close()
        server.close()


def test_a_like_in_flight_when_the_tab_closes_is_still_stored(web, page):
    """Online but slow: the POST is still under way when the listener closes the tab. The
    event is in the outbox and a Background Sync is already pending, so the service worker
    sends it with no page open.

    The page registers the sync before it flushes, and online the sync fires at once: the
    page's POST and the worker's race for the outbox. So every POST is held, the worker's
    too (the context's route), until the tab is gone; the one under way then is this test's
    slow POST, whoever sent it."""
    held: list = []
    page.context.route("**/v1/events", lambda route: held.append(route))  # no answer until the tab is closed
    track = page.locator("#recs li.track").first.get_attribute("data-track-id")
    page.locator(f"#recs li[data-track-id='{track}'] button[data-type=like]").click()
    # Playwright hands the route over while the page waits, hence the wait in the read.
    poll(lambda: (page.wait_for_timeout(50), len(held))[1], lambda n: n >= 1, 400)
    assert held, "the like was never sent"
    page.goto("about:blank")  # the tab is gone: its POST and its hold on the outbox lock with it
    page.context.unroute("**/v1/events")
    for route in held:
        try:
            route.continue_()  # the worker's POST goes on; the closed page's is gone with it
        except playwright_api.Error:
            pass
    events = poll(lambda: stored_events(web["settings"], page.user_id), lambda e: len(e) >= 1, 20_000)
    assert [(e["track_id"], e["event_type"]) for e in events] == [(track, "like")]


def test_sign_out_keeps_queued_feedback_under_its_own_key(web, page):
    """A listener likes offline and signs out; the next listener signs in (with a read-only
    key) before the network is back. The first listener's like is sent with their own key,
    the key is gone from the page's storage, and this browser leaves push for them."""
    from app.events.auth import ApiKeyStore
    from app.keys import Keys

    settings = web["settings"]
    endpoint = "https://fcm.googleapis.com/fcm/send/device-of-" + page.user_id
    page.evaluate(
        """(endpoint) => { PushManager.prototype.getSubscription = async () => ({ endpoint,
             unsubscribe: async () => { window.unsubscribed = endpoint; return true; } }); }""",
        endpoint,
    )
    unsubscribes = []
    page.route("**/v1/push/subscriptions", lambda route: (unsubscribes.append((route.request.method, route.request.post_data_json)), route.fulfill(status=204)))

    page.context.set_offline(True)
    page.wait_for_function("document.getElementById('network').textContent === 'offline'")
    track = page.locator("#recs li.track").first.get_attribute("data-track-id")
    page.locator(f"#recs li[data-track-id='{track}'] button[data-type=like]").click()
    page.wait_for_function("document.getElementById('outbox').dataset.size === '1'")
    page.click("#signout")
    page.wait_for_selector("body[data-signed-in=no]")
    assert page.evaluate("EchoQueue.getMeta('session')") is None
    assert page.evaluate("localStorage.getItem('echotune.session')") is None
    assert page.evaluate("window.unsubscribed") == endpoint
    assert unsubscribes == [("DELETE", {"user_id": page.user_id, "endpoint": endpoint})]

    client = redis.Redis.from_url(settings.redis.url)
    reader = ApiKeyStore(client, Keys(settings.redis.key_prefix)).create({"read"}).token  # cannot post events
    page.fill("#user-id", f"next-{page.user_id}")
    page.fill("#api-key", reader)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("body[data-signed-in=yes]")
    page.context.set_offline(False)
    page.wait_for_function("document.getElementById('outbox').dataset.size === '0'", timeout=30_000)
    events = stored_events(settings, page.user_id)
    assert [(e["track_id"], e["event_type"]) for e in events] == [(track, "like")]


def test_feedback_from_a_device_whose_clock_runs_fast_is_kept(web, page):
    """The gateway refuses events stamped beyond max_future_s; the outbox restamps them by the
    server's Date header once instead of dropping them."""
    ahead = datetime.now(timezone.utc) + timedelta(seconds=web["settings"].gateway.max_future_s + 3600)
    page.clock.set_fixed_time(ahead)
    result = page.evaluate(
        """async (user) => {
             await EchoQueue.enqueue({event_id: crypto.randomUUID(), user_id: user, track_id: 't001', event_type: 'like',
                                      timestamp: new Date().toISOString(), device_type: 'web'});
             return EchoQueue.flush(new URL('../', location.href)); }""",
        page.user_id,
    )
    assert result["state"] == "empty"
    events = stored_events(web["settings"], page.user_id)
    assert [(e["track_id"], e["event_type"]) for e in events] == [("t001", "like")]
    assert page.evaluate("EchoQueue.stats()")["rejected"] == 0

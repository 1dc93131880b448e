"""The PWA in real headless Chromium against the real Serve app and Redis: the service worker
registers and caches the shell, feedback made offline is replayed exactly once, a reload
while offline still shows the last recommendations, the offline queue is bounded."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from tests.web_support import PREFIX, launch_chromium

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def web(web_app):
    """The shared Serve app plus one Chromium for the module."""
    with playwright_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        yield {"settings": web_app["settings"], "url": f"{web_app['base']}/app/", "browser": browser}
        browser.close()


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

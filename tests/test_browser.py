"""The chat demo page in a real headless Chromium, through a 2-process cluster with conf/entries/chat.py.

Needs Debian's `chromium` and Playwright for Python (`make test` installs
both when it can); without them the test is skipped with the reason shown.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.ids import node_id_of
from conftest import MESHGATE, WAIT, Cluster

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Quiet, offline-friendly Chromium: no background traffic, no sandbox (tests run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
SECRET = "browser-test-secret-of-at-least-32-bytes"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"browser test skipped: Playwright for Python is not installed ({exc})")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser test skipped: no Chromium at {CHROMIUM} (Debian packages chromium, chromium-driver)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def chat_cluster(tmp_path_factory):
    chat = str(ROOT / "conf/entries/chat.py")
    instance = Cluster(tmp_path_factory.mktemp("browser"), workers=2,
                       server={"path": "/chat", "topic": "chat", "entry": chat, "demo": "/demo"},
                       extra_servers=[{"path": "/chat-auth", "topic": "chat", "entry": chat, "demo": "/demo-auth",
                                       "auth": {"jwt": {"secret": SECRET}}}])
    instance.start()
    yield instance
    instance.stop()


def open_chat(browser, cluster, room: str, demo: str = "/demo"):
    page = browser.new_page()
    page.set_default_timeout(WAIT * 1000)
    page.goto(f"http://127.0.0.1:{cluster.client_port}{demo}")
    page.wait_for_function("document.getElementById('state').textContent === 'connected'")
    page.fill("#room", room)
    page.click("#join")
    page.wait_for_selector(f"#log li:has-text('joined room:{room}')")
    return page


def say(page, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def sender_id(page, text: str) -> str:
    """The client_id the page's own message arrived with (`<client_id>: <text>` in its log)."""
    item = page.wait_for_selector(f"#log li:has-text(': {text}')")
    return item.text_content().split(":", 1)[0]


def test_two_pages_chat_through_the_mesh(browser, chat_cluster, tmp_path):
    """Two pages in one room (on different node processes): a typed message and a backend publish show in both."""
    first = open_chat(browser, chat_cluster, "lobby")
    say(first, "probe one")
    first_node = node_id_of(int(sender_id(first, "probe one")))
    for attempt in range(20):   # the kernel picks the process: reconnect until the second page is elsewhere
        second = open_chat(browser, chat_cluster, "lobby")
        say(second, f"probe two {attempt}")
        if node_id_of(int(sender_id(second, f"probe two {attempt}"))) != first_node:
            break
        second.close()
    else:
        pytest.fail("every page landed on the same node process")

    say(first, "hello from the first page")
    second.wait_for_selector("#log li:has-text('hello from the first page')")
    first.wait_for_selector("#log li:has-text('hello from the first page')")

    status, body = chat_cluster.http("/v1/mesh/publish", {"c": "room:lobby", "d": "notice from the backend"})
    assert status == 200 and body["r"] == {"s": 2, "f": 0}
    for page in (first, second):
        page.wait_for_selector("#log li:has-text('notice from the backend')")

    shot = tmp_path / "chat.png"
    first.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    first.close()
    second.close()


def members_of(page) -> list:
    return [item.text_content() for item in page.query_selector_all("#members li")]


def test_the_page_lists_who_is_in_the_room(browser, chat_cluster):
    """Presence on the page: the join lists the room's members mesh-wide; joins and leaves update it."""
    first = open_chat(browser, chat_cluster, "people")
    first.wait_for_function("document.getElementById('count').textContent === '1'")
    [mine] = members_of(first)
    assert mine.endswith(" (you)")
    second = open_chat(browser, chat_cluster, "people")
    for page in (first, second):
        page.wait_for_function("document.getElementById('count').textContent === '2'")
    first_id, second_id = mine.split()[0], next(m for m in members_of(second) if m.endswith(" (you)")).split()[0]
    assert sorted(members_of(first)) == sorted([f"{first_id} (you)", second_id])
    assert sorted(members_of(second)) == sorted([first_id, f"{second_id} (you)"])
    status, body = chat_cluster.http("/v1/channel/presence", {"c": "room:people"})
    assert status == 200 and {entry["c"] for entry in body["r"]["clients"]} == {first_id, second_id}
    second.close()   # the page goes: its connection closes, on_close tells the room
    first.wait_for_function("document.getElementById('count').textContent === '1'")
    assert members_of(first) == [f"{first_id} (you)"]
    third = open_chat(browser, chat_cluster, "elsewhere")
    third.fill("#room", "people")
    third.click("#join")
    first.wait_for_function("document.getElementById('count').textContent === '2'")
    third.fill("#room", "elsewhere")
    third.click("#join")   # switching rooms is a leave
    first.wait_for_function("document.getElementById('count').textContent === '1'")
    first.close()
    third.close()


def test_demo_page_is_self_contained(chat_cluster):
    """The page loads nothing from elsewhere: no external scripts, styles or fonts."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{chat_cluster.client_port}/demo", timeout=WAIT) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "/chat" in page and "__MESHGATE_WS_PATH__" not in page
    for marker in ("src=\"http", "href=\"http", "@import", "src='http", "href='http"):
        assert marker not in page


def test_demo_page_hands_the_token_of_its_url_to_the_websocket(browser, chat_cluster):
    """/demo-auth?token=<meshgate token> chats on a server with auth.jwt; without a token the page stays out."""
    made = subprocess.run([MESHGATE, "token", "--secret", SECRET, "--sub", "dora", "--ttl", "300"],
                          capture_output=True, text=True, timeout=WAIT)
    assert made.returncode == 0, made.stderr
    page = open_chat(browser, chat_cluster, "vip", demo=f"/demo-auth?token={made.stdout.strip()}")
    say(page, "with a token")
    sender_id(page, "with a token")
    page.close()
    refused = browser.new_page()
    refused.set_default_timeout(WAIT * 1000)
    refused.goto(f"http://127.0.0.1:{chat_cluster.client_port}/demo-auth")
    refused.wait_for_function("document.getElementById('state').textContent.startsWith('disconnected')")
    refused.close()

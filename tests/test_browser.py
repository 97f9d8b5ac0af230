"""The demo page and the client library in real headless Chromium (Selenium), against real
nodes, Redis and nginx: chat across nodes, live member lists, escaping, a rolling restart that
loses and duplicates nothing, a terminal close, history for a late joiner, and the library
imported by a page of another origin.

Tab A is a desktop window, tab B a phone-sized one. On a failure, screenshots, page sources
and browser console logs of both go to a temporary folder named in the test's output.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from roomcast.tools.balancer import find_nginx
from roomcast.tools.cluster import LocalCluster

API_KEY = "browser-test-key-0123456789abcdef0123"
NODE_FLAGS = ["--presence-grace", "0.5", "--rate-burst", "500", "--api-key", API_KEY]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 10.0


def chromium() -> str:
    for path in (*CHROMIUM, shutil.which("chromium") or ""):
        if path and Path(path).exists():
            return path
    raise RuntimeError("chromium is not installed (./dev test installs chromium and "
                       "chromium-driver)")


def browser(width: int, height: int) -> WebDriver:
    """A headless Chromium of that window size, with its console log kept."""
    if not Path(CHROMEDRIVER).exists():
        raise RuntimeError(f"{CHROMEDRIVER} is missing (./dev test installs chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT)
    return driver


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two nodes and Redis behind nginx; the nodes run the server API (for a kick)."""
    find_nginx()
    local = LocalCluster(tmp_path_factory.mktemp("cluster")).start(nodes=2,
                                                                    node_flags=NODE_FLAGS)
    try:
        yield local
    finally:
        local.stop(drain=False)


@pytest.fixture(scope="module")
def drivers() -> Iterator[tuple[WebDriver, WebDriver]]:
    a = browser(1100, 800)
    try:
        b = browser(390, 844)  # A phone.
    except BaseException:
        a.quit()
        raise
    try:
        yield a, b
    finally:
        a.quit()
        b.quit()


@pytest.fixture
def tabs(drivers: tuple[WebDriver, WebDriver],
         request: pytest.FixtureRequest) -> Iterator[tuple[WebDriver, WebDriver]]:
    """Both browsers; after a failed test, what they showed is saved to a temporary folder."""
    failed_before = request.session.testsfailed
    yield drivers
    if request.session.testsfailed > failed_before:
        folder = Path(tempfile.mkdtemp(prefix=f"roomcast-browser-{request.node.name[:40]}-"))
        for name, driver in zip("AB", drivers, strict=True):
            try:
                driver.save_screenshot(str(folder / f"{name}.png"))
                (folder / f"{name}.html").write_text(driver.page_source)
                console = driver.get_log("browser")  # type: ignore[no-untyped-call]
                (folder / f"{name}.console.json").write_text(json.dumps(console, indent=1))
            except WebDriverException as exc:
                (folder / f"{name}.error.txt").write_text(str(exc))
        print(f"browser screenshots and logs: {folder}", file=sys.stderr)
    for driver in drivers:  # Leave every room: the next test starts from a blank page.
        driver.get("about:blank")


# --- what a page shows --------------------------------------------------------------------


def until(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any],
          timeout: float = WAIT) -> Any:
    """Wait (bounded) for ``condition``; fail naming ``what``."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        condition, message=f"timed out after {timeout:g} s waiting for {what}")


def state(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "status").get_attribute("data-state"))


def node_of(driver: WebDriver) -> str:
    return str(driver.execute_script("return window.demo.rc.user.node_id"))


def messages(driver: WebDriver) -> list[dict[str, Any]]:
    """The messages on screen, in order: offset, epoch, user id, shown name and text."""
    return list(driver.execute_script("""
        return [...document.querySelectorAll('#log li.msg')].map((li) => ({
          offset: +li.dataset.offset, epoch: li.dataset.epoch, user: li.dataset.user,
          who: li.querySelector('.who').textContent, text: li.querySelector('.text').textContent,
          time: li.querySelector('time').dateTime }));"""))


def texts(driver: WebDriver) -> list[str]:
    return [m["text"] for m in messages(driver)]


def shown_text(driver: WebDriver, selector: str) -> list[str]:
    """The text of every element matching ``selector``, read at once (lists are re-rendered:
    element handles would go stale)."""
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)",
        selector))


def members(driver: WebDriver) -> list[str]:
    return shown_text(driver, "#memberlist li")


def notes(driver: WebDriver, kind: str = "note") -> list[str]:
    return shown_text(driver, f"#log li.{kind}")


def open_chat(driver: WebDriver, base: str, name: str, room: str) -> None:
    """Open the page on ``room`` as ``name`` (it joins at once) and wait until it is in."""
    driver.get(f"{base}/?room={quote(room)}&name={quote(name)}")
    until(driver, f"{name} connected", lambda d: state(d) == "connected")
    until(driver, f"{name} in the member list", lambda d: name in members(d))


def say(driver: WebDriver, text: str) -> None:
    driver.find_element(By.ID, "text").send_keys(text + "\n")


def switch_room(driver: WebDriver, room: str) -> None:
    field = driver.find_element(By.ID, "room")
    field.clear()
    field.send_keys(room)
    driver.find_element(By.ID, "go").click()


# --- the tests ----------------------------------------------------------------------------


def test_two_tabs_chat_on_two_nodes_through_nginx(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """Alice and Bob, on different nodes behind nginx, see each other's messages, names and
    typing, with local timestamps; the phone-sized tab does not scroll sideways."""
    a, b = tabs
    open_chat(a, cluster.http_url, "Alice", "lobby")
    open_chat(b, cluster.http_url, "Bob", "lobby")
    assert node_of(a) != node_of(b)
    assert {node_of(a), node_of(b)} == {n.node_id for n in cluster.nodes}
    until(a, "Bob in Alice's list", lambda d: members(d) == ["Alice", "Bob"])
    assert members(b) == ["Alice", "Bob"]
    assert "Bob joined" in notes(a)

    say(a, "hello from Alice")
    until(b, "Alice's message at Bob", lambda d: texts(d) == ["hello from Alice"])
    say(b, "hi Alice")
    until(a, "Bob's reply at Alice", lambda d: texts(d) == ["hello from Alice", "hi Alice"])
    assert [m["who"] for m in messages(a)] == ["Alice", "Bob"]
    assert [m["offset"] for m in messages(b)] == [m["offset"] for m in messages(a)]
    shown_time = a.find_element(By.CSS_SELECTOR, "#log li.msg time").text
    expected = a.execute_script(
        "const t = document.querySelector('#log li.msg time');"
        "return new Intl.DateTimeFormat(undefined, {hour: '2-digit', minute: '2-digit',"
        " second: '2-digit'}).format(new Date(t.dateTime));")
    assert shown_time == expected and shown_time

    a.find_element(By.ID, "text").send_keys("typing")
    until(b, "Alice typing", lambda d: d.find_element(By.ID, "typing").text
          == "Alice is typing…")
    assert b.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert b.find_element(By.ID, "text").is_displayed()


def test_member_lists_follow_joins_and_leaves(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """Each side's member list follows the other's leaving and coming back, with notices."""
    a, b = tabs
    open_chat(a, cluster.http_url, "Alice", "members")
    open_chat(b, cluster.http_url, "Bob", "members")
    until(a, "both in A's list", lambda d: members(d) == ["Alice", "Bob"])

    switch_room(b, "members-elsewhere")
    until(a, "Bob gone from A's list", lambda d: members(d) == ["Alice"])
    assert "Bob left" in notes(a)
    until(b, "B alone in the other room", lambda d: members(d) == ["Bob"])

    switch_room(b, "members")
    until(a, "Bob back in A's list", lambda d: members(d) == ["Alice", "Bob"])
    assert notes(a)[-1] == "Bob joined"
    until(b, "both in B's list", lambda d: members(d) == ["Alice", "Bob"])

    a.get("about:blank")  # Alice closes her tab.
    until(b, "Alice gone from B's list", lambda d: members(d) == ["Bob"])
    assert notes(b)[-1] == "Alice left"


def test_html_in_names_and_messages_is_shown_as_text(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """A name and a message full of HTML and script are shown literally and never run."""
    a, b = tabs
    name = "<img src=x onerror=window.pwned=1>"
    text = "<script>window.pwned=2</script><b>bold</b> & <i onmouseover=alert(1)>x</i>"
    open_chat(a, cluster.http_url, name, "xss")
    open_chat(b, cluster.http_url, "Bob", "xss")
    say(a, text)
    for driver in (a, b):
        until(driver, "the message", lambda d: texts(d) == [text])
        assert messages(driver)[0]["who"] == name
        assert name in members(driver)
        assert driver.find_elements(By.CSS_SELECTOR, "#log img, #log b, #log i, #log script,"
                                    " #memberlist img") == []
        assert driver.execute_script("return window.pwned") is None


def test_history_is_shown_to_a_late_joiner(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """Bob, joining after Alice spoke, sees her messages in order with their times."""
    a, b = tabs
    open_chat(a, cluster.http_url, "Alice", "history")
    for i in range(3):
        say(a, f"before you came {i}")
    until(a, "three messages", lambda d: len(texts(d)) == 3)
    open_chat(b, cluster.http_url, "Bob", "history")
    until(b, "the history", lambda d: texts(d) == [f"before you came {i}" for i in range(3)])
    shown = messages(b)
    assert [m["who"] for m in shown] == ["Alice"] * 3
    assert [m["offset"] for m in shown] == [1, 2, 3]
    assert all(m["time"] for m in shown)


def test_the_library_from_a_page_of_another_origin(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """A page on another origin imports /roomcast.js from a node (CORS) and chats with it."""
    a, _ = tabs
    node = cluster.nodes[0]
    a.get(f"{cluster.http_url}/healthz")  # Any page of the balancer's origin.
    result = a.execute_async_script("""
        const [library, ws, done] = arguments;
        (async () => {
          const { Roomcast } = await import(library);
          const rc = new Roomcast(ws + "?user_id=dev&username=Dev");
          const room = rc.room("readme");
          const got = new Promise((resolve) => room.on("message", resolve));
          await rc.connect();
          await room.join();
          const ack = await room.publish({ text: "hello" });
          const message = await got;
          rc.disconnect();
          return { ack, text: message.data.text, from: message.from.username, state: rc.state };
        })().then(done, (e) => done({ error: String(e) }));
        """, f"{node.http_url}/roomcast.js", cluster.ws_url)
    assert result == {"ack": {"offset": 1, "epoch": result["ack"]["epoch"]}, "text": "hello",
                      "from": "Dev", "state": "disconnected"}
    with urllib.request.urlopen(f"{node.http_url}/roomcast.d.ts", timeout=5) as reply:
        assert b"export class Roomcast" in reply.read()


def test_a_terminal_close_stops_reconnecting(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """Kicked with 4500 through the server API, the tab says so and does not come back."""
    a, _ = tabs
    open_chat(a, cluster.http_url, "Alice", "kick")
    user = a.execute_script("return window.demo.rc.user.user_id")
    request = urllib.request.Request(
        f"{cluster.nodes[0].api_url}/api/disconnect", method="POST",
        data=json.dumps({"user": user, "code": 4500}).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200
    until(a, "the closed state", lambda d: state(d) == "closed")
    assert "4500" in a.find_element(By.ID, "status").text
    assert not a.find_element(By.ID, "text").is_enabled()
    # A reconnect would begin within the first backoff (at most 0.5 s): give it three times that.
    with pytest.raises(TimeoutException):
        until(a, "a reconnect attempt", lambda d: state(d) != "closed", timeout=1.5)
    states = a.execute_script("return window.demo.states")
    assert states[states.index("closed"):] == ["closed"]


@pytest.mark.timeout(120)
def test_a_rolling_restart_loses_and_duplicates_nothing(
        cluster: LocalCluster, tabs: tuple[WebDriver, WebDriver]) -> None:
    """Both tabs keep publishing while every node is replaced: each message shows exactly once,
    in order, in both tabs, which go reconnecting, then connected to the new nodes. (Last in
    the file: it replaces the nodes the other tests use.)"""
    a, b = tabs
    open_chat(a, cluster.http_url, "Alice", "restart")
    open_chat(b, cluster.http_url, "Bob", "restart")
    old_nodes = {n.node_id for n in cluster.nodes}
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            cluster.rolling_restart()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=restart, name="rolling-restart")
    sent: dict[str, list[str]] = {"Alice": [], "Bob": []}
    offline = 0  # Messages typed while their tab was not connected: queued by the library.
    worker.start()
    deadline = time.monotonic() + cluster.restart_timeout()
    while worker.is_alive() and time.monotonic() < deadline:
        for driver, name in ((a, "Alice"), (b, "Bob")):
            sent[name].append(f"{name[0]}-{len(sent[name]) + 1}")
            offline += state(driver) != "connected"
            say(driver, sent[name][-1])
        time.sleep(0.1)  # Pacing the senders, not waiting for a result.
    worker.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not worker.is_alive() and errors == []
    for driver, name in ((a, "Alice"), (b, "Bob")):  # And once more on the new nodes.
        sent[name].append(f"{name[0]}-{len(sent[name]) + 1}")
        say(driver, sent[name][-1])

    total = len(sent["Alice"]) + len(sent["Bob"])
    print(f"{total} messages sent, {offline} of them while their tab was reconnecting")
    for driver in (a, b):
        until(driver, "connected again", lambda d: state(d) == "connected")
        until(driver, f"all {total} messages", lambda d: len(texts(d)) >= total, timeout=20)
    shown_a, shown_b = messages(a), messages(b)
    assert shown_a == shown_b
    offsets = [m["offset"] for m in shown_a]
    assert offsets == list(range(offsets[0], offsets[0] + total)), "in order, no gap"
    shown = [m["text"] for m in shown_a]
    assert len(set(shown)) == total and sorted(shown) == sorted(sent["Alice"] + sent["Bob"])
    for name in sent:
        assert [t for t in shown if t[0] == name[0]] == sent[name], f"{name}'s order"
    for driver in (a, b):
        assert notes(driver, "error") == []
        states = driver.execute_script("return window.demo.states")
        assert "reconnecting" in states
        assert states[-1] == "connected"
        assert states.index("reconnecting") < len(states) - 1
        assert node_of(driver) not in old_nodes

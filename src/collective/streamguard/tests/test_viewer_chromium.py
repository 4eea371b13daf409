"""The log viewer in a real headless Chromium against a real waitress.

Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them),
driven by Selenium with the system browser and driver: no browser is
downloaded.  A manager logs in, opens the viewer, sees appended lines arrive
(as text, whatever HTML they hold), filters them, and closes the tab; the
server-side stream must have ended within a second, as @@stream-status says.
And what README.rst tells a Volto or other JavaScript client: a streaming
``fetch()`` with a JSON web token from ``@login``, or an EventSource with
the cookie ``@login`` sets.
"""

import os

from collective.streamguard.testing import STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING
from collective.streamguard.testing import set_product_config
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import LogTestCase

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_driver(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            raise RuntimeError(
                f"{path} is missing: install Debian's chromium and chromium-driver "
                "(`make test` does, as root)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags this machine's closed network needs (no background
    # connections to Google's hosts), and root's need for --no-sandbox.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class ChromiumTestCase(LogTestCase):
    """A headless Chromium for every test, quit before the streams are checked."""

    old_lines = "an old line\n"

    def setUp(self):
        super().setUp()
        self.driver = chromium_driver(os.path.join(self.directory, "profile"))
        self.base = f"http://{self.layer['host']}:{self.layer['port']}/plone"

    def tearDown(self):
        # The browser goes first: the base class checks no stream is left.
        self.driver.quit()
        super().tearDown()

    def wait(self, condition, timeout=10, message=""):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(lambda d: condition(), message)

    def log_in(self):
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.base}/login")
        self.driver.find_element(By.NAME, "__ac_name").send_keys("admin")
        self.driver.find_element(By.NAME, "__ac_password").send_keys("secret")
        self.driver.find_element(By.NAME, "buttons.login").click()
        self.wait(
            lambda: "__ac" in {c["name"] for c in self.driver.get_cookies()},
            message="login did not set the auth cookie",
        )

    def live_streams(self):
        return self.status_json()["live"]


class TestViewerInChromium(ChromiumTestCase):
    def test_follow_filter_escape_and_close(self):
        from selenium.webdriver.common.by import By

        self.log_in()
        self.driver.get(f"{self.base}/@@stream-log-viewer")
        viewer = self.driver.find_element(By.ID, "streamguard-viewer")
        output = self.driver.find_element(By.ID, "streamguard-output")
        self.wait(
            lambda: viewer.get_attribute("data-state") == "Following.",
            message="the viewer did not start following",
        )
        self.assertEqual(self.driver.find_element(By.ID, "streamguard-name").text, "app")
        self.wait(lambda: "an old line" in output.text)

        self.write("2026-11-21 INFO a line with <script>window.pwned=1</script> in it\n")
        self.write("2026-11-21 ERROR something broke\n")
        self.write("2026-11-21 WARNING something odd\n")
        self.wait(lambda: "something odd" in output.text, message="appended lines never showed")
        # Shown as text, never run or parsed as HTML.
        self.assertIn("<script>window.pwned=1</script>", output.text)
        self.assertEqual(output.find_elements(By.TAG_NAME, "script"), [])
        self.assertIsNone(self.driver.execute_script("return window.pwned"))
        levels = {
            line.text: line.get_attribute("data-level")
            for line in output.find_elements(By.CLASS_NAME, "streamguard-line")
        }
        self.assertEqual(levels["2026-11-21 ERROR something broke"], "error")
        self.assertEqual(levels["2026-11-21 WARNING something odd"], "warning")

        self.driver.find_element(By.ID, "streamguard-filter").send_keys("ERROR")
        visible = [
            line.text
            for line in output.find_elements(By.CLASS_NAME, "streamguard-line")
            if line.is_displayed()
        ]
        self.assertEqual(visible, ["2026-11-21 ERROR something broke"])

        # Pause stops the stream; follow resumes from where it stopped.
        self.driver.find_element(By.ID, "streamguard-pause").click()
        self.wait(lambda: not self.live_streams(), message="pause did not end the stream")
        self.write("2026-11-21 ERROR while paused\n")
        self.driver.find_element(By.ID, "streamguard-follow").click()
        self.wait(lambda: "while paused" in output.text)
        self.assertEqual(output.text.count("something broke"), 1)

        # Close the tab: the server-side stream must end within a second.
        self.assertEqual(len(self.live_streams()), 1)
        first = self.driver.current_window_handle
        self.driver.switch_to.new_window("tab")
        self.driver.get(f"{self.base}/@@stream-log-viewer")
        self.wait(lambda: len(self.live_streams()) == 2, message="second tab never streamed")
        self.driver.close()
        self.assertTrue(
            wait_for(lambda: len(self.live_streams()) <= 1, timeout=1.0),
            "the stream outlived its tab by 1 s",
        )
        self.driver.switch_to.window(first)
        self.assertEqual(len(self.live_streams()), 1)


class TestViewerNamesItsInstance(ChromiumTestCase):
    def name_instance(self, name):
        """As zope.conf's ``instance-name``, for the rest of the test."""
        set_product_config(self, **{"instance-name": name})

    def test_instance_always_shown_and_a_switch_is_a_divider(self):
        from selenium.webdriver.common.by import By

        # Whatever the server says is shown as text, also an instance's name.
        first = '<img src="x" onerror="window.pwned=1">backend-1'
        self.name_instance(first)
        self.log_in()
        self.driver.get(f"{self.base}/@@stream-log-viewer")
        viewer = self.driver.find_element(By.ID, "streamguard-viewer")
        output = self.driver.find_element(By.ID, "streamguard-output")
        instance = self.driver.find_element(By.ID, "streamguard-instance")
        self.wait(lambda: instance.text == f"on {first}", message="the instance is not shown")
        self.assertEqual(viewer.get_attribute("data-instance"), first)
        self.write("before the switch\n")
        self.wait(lambda: "before the switch" in output.text)

        # Paused; the log rotates, and the stream comes back from another
        # instance (here: the same server under another name): the id the
        # viewer resumes with names a file that is not followed any more.
        self.driver.find_element(By.ID, "streamguard-pause").click()
        self.wait(lambda: not self.live_streams(), message="pause did not end the stream")
        os.rename(self.path, self.path + ".1")
        self.write("after the switch\n", mode="w")
        self.name_instance("backend-2")
        self.driver.find_element(By.ID, "streamguard-follow").click()
        self.wait(lambda: "after the switch" in output.text, message="no line after the switch")
        self.assertEqual(instance.text, "on backend-2")
        [divider] = output.find_elements(By.CLASS_NAME, "streamguard-divider")
        self.assertEqual(
            divider.text,
            "Switched to log app on backend-2 (other file): its last 100 lines follow.",
        )
        lines = [element.text for element in output.find_elements(By.XPATH, "./*")]
        self.assertEqual(
            lines,
            ["an old line", "before the switch", divider.text, "after the switch"],
        )
        self.assertEqual(self.driver.find_elements(By.CSS_SELECTOR, "#streamguard-viewer img"), [])
        self.assertIsNone(self.driver.execute_script("return window.pwned"))

        # A reconnect to the same file is no switch: no second divider.
        self.driver.find_element(By.ID, "streamguard-pause").click()
        self.wait(lambda: not self.live_streams(), message="pause did not end the stream")
        self.write("while paused\n")
        self.driver.find_element(By.ID, "streamguard-follow").click()
        self.wait(lambda: "while paused" in output.text, message="no line after the resume")
        self.assertEqual(len(output.find_elements(By.CLASS_NAME, "streamguard-divider")), 1)
        self.assertEqual(output.text.count("after the switch"), 1)


class TestViewerReconnects(ChromiumTestCase):
    def test_a_refused_viewer_tries_again_after_a_random_delay(self):
        from selenium.webdriver.common.by import By

        # The user's one stream slot is taken: the viewer's EventSource is
        # answered 429, and EventSource itself never tries again.
        self.configure(max_streams_per_user=1)
        other, _head = self.follow("log=app&format=sse")
        self.log_in()
        self.driver.get(f"{self.base}/@@stream-log-viewer")
        viewer = self.driver.find_element(By.ID, "streamguard-viewer")
        self.wait(
            lambda: (viewer.get_attribute("data-state") or "").startswith("Reconnecting in "),
            message="the refused viewer did not plan to try again",
        )
        delay = int(viewer.get_attribute("data-state").split()[2])
        self.assertTrue(2 <= delay <= 6, delay)
        other.close()
        self.wait(
            lambda: viewer.get_attribute("data-state") == "Following.",
            timeout=30,
            message="the viewer did not come back",
        )
        output = self.driver.find_element(By.ID, "streamguard-output")
        self.wait(lambda: "an old line" in output.text)


#: Run in a page of the site: a JSON web token from plone.restapi's @login,
#: then @@stream-log read with a streaming fetch() that sends it, as Volto
#: can (EventSource cannot send an Authorization header).  No cookie goes
#: either way (credentials: "omit"): the token alone lets the request in.
FETCH_WITH_TOKEN = """
const [loginUrl, streamUrl, login, password] = arguments;
const state = (window.streamguardTest = {received: "", status: null, error: null, ended: false});
(async () => {
    const answer = await fetch(loginUrl, {
        method: "POST",
        credentials: "omit",
        headers: {"Accept": "application/json", "Content-Type": "application/json"},
        body: JSON.stringify({login, password}),
    });
    const {token} = await answer.json();
    const response = await fetch(streamUrl, {
        credentials: "omit",
        headers: {"Authorization": "Bearer " + token},
    });
    state.status = response.status;
    state.reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
        const {value, done} = await state.reader.read();
        if (done) break;
        state.received += decoder.decode(value, {stream: true});
    }
    state.ended = true;
})().catch((error) => { state.error = String(error); });
"""

#: The other way: @login also sets Plone's ``__ac`` cookie, which an
#: EventSource of the same origin sends.
EVENTSOURCE_WITH_COOKIE = """
const [loginUrl, streamUrl, login, password] = arguments;
const state = (window.streamguardTest = {received: "", status: null, error: null});
(async () => {
    const answer = await fetch(loginUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {"Accept": "application/json", "Content-Type": "application/json"},
        body: JSON.stringify({login, password}),
    });
    state.status = answer.status;
    state.source = new EventSource(streamUrl, {withCredentials: true});
    state.source.onmessage = (event) => { state.received += event.data + "\\n"; };
})().catch((error) => { state.error = String(error); });
"""


class TestJavaScriptClients(ChromiumTestCase):
    """What README.rst tells a Volto or other JavaScript client to do."""

    layer = STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING

    def state(self, name):
        return self.driver.execute_script(f"return window.streamguardTest.{name}")

    def run_client(self, script, query):
        # A page of the site, so that the client is of the same origin.
        self.driver.get(f"{self.base}/robots.txt")
        self.driver.execute_script(
            script, f"{self.base}/@login", f"{self.base}/@@stream-log?{query}", "admin", "secret"
        )
        self.wait(
            lambda: self.live_streams() or self.state("error"), message="the stream never started"
        )
        self.assertIsNone(self.state("error"))
        [stream] = self.live_streams()
        self.assertEqual(stream["user"], "admin")
        self.write("2026-11-21 INFO a line for the JavaScript client\n")
        self.wait(
            lambda: "a line for the JavaScript client" in self.state("received"),
            message="the appended line never reached the client",
        )
        self.assertEqual(self.state("status"), 200)
        self.assertIsNone(self.state("error"))

    def test_streaming_fetch_with_a_bearer_token(self):
        self.run_client(FETCH_WITH_TOKEN, "log=app")
        self.assertNotIn("__ac", {c["name"] for c in self.driver.get_cookies()})
        # Cancelling the reader closes the connection: the stream ends.
        self.driver.execute_script("window.streamguardTest.reader.cancel()")
        self.wait(lambda: not self.live_streams(), message="the stream outlived its reader")

    def test_eventsource_with_the_cookie_of_login(self):
        self.run_client(EVENTSOURCE_WITH_COOKIE, "log=app&format=sse")
        self.assertIn("__ac", {c["name"] for c in self.driver.get_cookies()})
        self.driver.execute_script("window.streamguardTest.source.close()")
        self.wait(lambda: not self.live_streams(), message="the stream outlived its EventSource")

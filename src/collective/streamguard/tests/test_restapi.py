"""plone.restapi (Volto): ``@stream-status`` and the control panel, over a real server.

Requests as plone.restapi's own functional tests make them: ``Accept:
application/json``, basic auth or a JWT token from ``POST @login``.
"""

import json
import socket

from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD
from plone.app.testing import TEST_USER_NAME
from plone.app.testing import TEST_USER_PASSWORD

from collective.streamguard.browser.status import status
from collective.streamguard.testing import STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING
from collective.streamguard.tests import views
from collective.streamguard.tests.streamcases import StreamingTestCase

OWNER = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
MEMBER = (TEST_USER_NAME, TEST_USER_PASSWORD)
PANEL = "@controlpanels/streamguard-controlpanel"


class RestAPITestCase(StreamingTestCase):
    layer = STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING

    def api(self, method, path, body=None, auth=None, token=None):
        """(status, headers, JSON or None) of ``method /plone/path``."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(body)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        status, headers, payload = self.http(
            f"/plone/{path}", method, auth=auth, headers=headers, body=body
        )
        return status, headers, json.loads(payload) if payload else None

    def login(self, user, password):
        code, _, answer = self.api("POST", "@login", {"login": user, "password": password})
        self.assertEqual(code, 200, answer)
        return answer["token"]


class TestStreamStatusService(RestAPITestCase):
    def test_site_owner_with_basic_auth_sees_the_live_stream(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=gated", auth=True)
        sock.read_until(f"first line of {tag}".encode())
        code, headers, answer = self.api("GET", "@stream-status", auth=OWNER)
        self.assertEqual(code, 200, answer)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(
            set(answer),
            {
                "instance",
                "scope",
                "live",
                "ended",
                "refused",
                "open_zodb_sessions",
                "parked",
                "holding_a_thread",
                "places",
                "pool",
                "workers",
            },
        )
        # Which instance answers, and that the counts are its own.
        self.assertEqual(answer["instance"], f"{socket.gethostname()}:{self.layer['port']}")
        self.assertEqual(answer["scope"], "instance")
        # The stream waits at its gate: nothing about it changes meanwhile.
        self.assertEqual(answer["live"], status()["live"])
        [stream] = answer["live"]
        self.assertTrue(stream["label"].endswith("/plone/@@streamguard-test-stream"), stream)
        self.assertEqual(stream["user"], SITE_OWNER_NAME)
        views.gate(tag).set()
        sock.body()
        self.assert_cleaned_up_once(tag, "finished")

    def test_same_data_as_the_json_of_the_stream_status_page(self):
        code, _, answer = self.api("GET", "@stream-status", auth=OWNER)
        self.assertEqual(code, 200, answer)
        code, _, page = self.api("GET", "@@stream-status?format=json", auth=OWNER)
        self.assertEqual(code, 200, page)
        self.assertEqual(answer, page)

    def test_jwt_token_from_login_works(self):
        token = self.login(SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
        code, _, answer = self.api("GET", "@stream-status", token=token)
        self.assertEqual(code, 200, answer)
        self.assertIn("ended", answer)

    def test_anonymous_gets_401(self):
        code, _, answer = self.api("GET", "@stream-status")
        self.assertEqual(code, 401, answer)
        self.assertNotIn("live", answer)

    def test_member_without_manage_portal_is_refused(self):
        code, _, answer = self.api("GET", "@stream-status", auth=MEMBER)
        self.assertIn(code, (401, 403), answer)
        self.assertNotIn("live", answer)
        token = self.login(TEST_USER_NAME, TEST_USER_PASSWORD)
        code, _, answer = self.api("GET", "@stream-status", token=token)
        self.assertIn(code, (401, 403), answer)


class TestControlpanel(RestAPITestCase):
    def test_controlpanels_lists_the_add_on_panel(self):
        code, _, answer = self.api("GET", "@controlpanels", auth=OWNER)
        self.assertEqual(code, 200, answer)
        panels = {panel["@id"].rsplit("/", 1)[-1]: panel for panel in answer}
        self.assertIn("streamguard-controlpanel", panels)
        self.assertEqual(panels["streamguard-controlpanel"]["title"], "Stream guard")
        self.assertTrue(panels["streamguard-controlpanel"]["group"])

    def test_get_reads_the_settings(self):
        code, _, answer = self.api("GET", PANEL, auth=OWNER)
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer["data"]["max_duration"], 3600)
        self.assertEqual(answer["data"]["heartbeat_interval"], 15)
        self.assertIn("max_duration", answer["schema"]["properties"])

    def test_patch_changes_max_duration(self):
        token = self.login(SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
        code, _, answer = self.api("PATCH", PANEL, {"max_duration": 120}, token=token)
        self.assertEqual(code, 204, answer)
        code, _, answer = self.api("GET", PANEL, token=token)
        self.assertEqual(answer["data"]["max_duration"], 120)

    def test_patch_refuses_a_log_the_form_refuses_and_says_why(self):
        code, _, answer = self.api(
            "PATCH", PANEL, {"log_files": ["app|relative/app.log"]}, auth=OWNER
        )
        self.assertEqual(code, 400, answer)
        self.assertIn("absolute", json.dumps(answer))
        code, _, answer = self.api("GET", PANEL, auth=OWNER)
        self.assertEqual(answer["data"]["log_files"], [])

    def test_member_cannot_read_or_change_the_settings(self):
        code, _, answer = self.api("GET", PANEL, auth=MEMBER)
        self.assertIn(code, (401, 403), answer)
        code, _, answer = self.api("PATCH", PANEL, {"max_duration": 1}, auth=MEMBER)
        self.assertIn(code, (401, 403), answer)
        code, _, answer = self.api("GET", PANEL, auth=OWNER)
        self.assertEqual(answer["data"]["max_duration"], 3600)

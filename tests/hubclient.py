"""A scripted browser for the hub and its identity provider, and a kernel client, for end-to-end tests.

Standard library plus tornado (which JupyterHub brings) for the kernel websocket.
"""

import http.cookiejar
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Page(HTMLParser):
    """Forms (action, method, fields, buttons) and text of an HTML page."""

    def __init__(self, body):
        super().__init__()
        self.forms, self._text = [], []
        self.feed(body)

    @property
    def text(self):
        return " ".join(" ".join(self._text).split())

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action") or "", "method": a.get("method", "get"), "fields": {},
                               "buttons": []})
        elif self.forms and tag == "input" and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif self.forms and tag == "button":
            self.forms[-1]["buttons"].append((a.get("name"), a.get("value")))

    def handle_data(self, data):
        self._text.append(data)


class Browser:
    """Cookies, redirects followed by hand, forms submitted as a browser would."""

    def __init__(self):
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirect())

    def request(self, url, data=None, headers=None, method=None, json_body=None):
        body = None
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            body = urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            response = self.opener.open(req, timeout=60)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            return response.code, response.headers, response.read().decode("utf-8", "replace")

    def follow(self, url, data=None, stop=lambda url: False):
        for _ in range(20):
            status, headers, body = self.request(url, data)
            data = None
            if status not in (301, 302, 303, 307, 308):
                return status, body, url
            url = urllib.parse.urljoin(url, headers["Location"])
            if stop(url):
                return status, body, url
        raise AssertionError("too many redirects")

    def cookie(self, name):
        return next((c.value for c in self.cookies if c.name == name), None)


def log_in(hub_url, username, password):
    """Log in through the hub's OIDC login: the provider's real login and consent forms.

    Returns (browser, status, body, url) of the page the hub lands on.
    """
    b = Browser()
    status, body, url = b.follow(f"{hub_url}/hub/oauth_login?next=%2Fhub%2Fhome")
    page = Page(body)
    assert status == 200 and page.forms, (status, url, body[:500])
    login = page.forms[0]
    status, body, url2 = b.follow(urllib.parse.urljoin(url, login["action"]),
                                  {**login["fields"], "username": username, "password": password})
    page = Page(body)
    consent = [f for f in page.forms if ("decision", "approve") in f["buttons"]]
    if not consent:  # refused at the provider (wrong password) or at the hub
        return b, status, body, url2
    status, body, url3 = b.follow(urllib.parse.urljoin(url2, consent[0]["action"]),
                                  {**consent[0]["fields"], "decision": "approve"})
    return b, status, body, url3


def hub_api(browser, hub_url, path, method="GET", body=None, token=None):
    headers = {}
    if token:
        headers["Authorization"] = f"token {token}"
    else:
        headers["X-XSRFToken"] = browser.cookie("_xsrf") or ""
    status, _, text = browser.request(f"{hub_url}/hub/api{path}", method=method, headers=headers,
                                      json_body=body if body is not None else ({} if method in ("POST", "PUT")
                                                                               else None))
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def wait_until_ready(browser, hub_url, user, server, token, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, model = hub_api(browser, hub_url, f"/users/{user}", token=token)
        s = (model or {}).get("servers", {}).get(server) if isinstance(model, dict) else None
        if s and s.get("ready"):
            return s
        time.sleep(0.5)
    raise TimeoutError(f"{user}/{server} did not become ready")


async def run_code(server_url, token, code, timeout=60, kernel="ngp-python"):
    """Start a kernel (ngp-python) on the server, run ``code`` over the kernel websocket, return stdout."""
    from ngp_research.reports.runner import run_in_kernel

    out, error = await run_in_kernel(server_url, token, code, timeout=timeout, kernel=kernel, username="test")
    if error:
        raise RuntimeError(error)
    return out

"""The development OpenID Connect provider (hub/idp, npm oidc-provider), driven like a browser.

One provider runs for the whole module on a free 127.0.0.1 port. The registered redirect URI is a
127.0.0.1 URL where nothing listens: the scripted browser stops at the redirect to it and reads
the authorization code from the Location header.
"""

import base64
import hashlib
import http.cookiejar
import json
import secrets
import stat
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ngp_research.identity.devprovider import (
    DevIdentityProvider,
    ensure_node_modules,
    roster_from_users,
)

PASSWORD = "correct horse battery staple"
CLIENT_ID = "jupyterhub"
CLIENT_SECRET = "hub-" + secrets.token_urlsafe(16)
REDIRECT_URI = "http://127.0.0.1:9/hub/oauth_callback"  # port 9 (discard): nothing listens
USERS = [
    ("admin-syd", ["region-admin:syd"]),
    ("lars", ["project-lead", "researcher"]),
    ("clara", ["reviewer"]),
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    ensure_node_modules()
    provider = DevIdentityProvider(state_dir=str(tmp_path_factory.mktemp("idp") / "state"))
    provider.write_config(
        roster_from_users(USERS, PASSWORD),
        [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [REDIRECT_URI]}],
    )
    with provider:
        yield provider


# ------------------------------------------------------------------ a scripted browser


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the caller follows redirects itself


class _Forms(HTMLParser):
    """The forms of a page: action, method, fields (name -> value) and submit buttons."""

    def __init__(self):
        super().__init__()
        self.forms = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action"), "method": a.get("method", "get"), "fields": {}, "buttons": []})
        elif self.forms and tag == "input" and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif self.forms and tag == "button":
            self.forms[-1]["buttons"].append((a.get("name"), a.get("value")))

    def handle_data(self, data):
        self.text.append(data)


class Browser:
    def __init__(self):
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect()
        )

    def request(self, url, data=None, headers=None):
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, headers=headers or {})
        try:
            response = self.opener.open(req, timeout=10)
        except urllib.error.HTTPError as error:  # 3xx (not followed), 4xx, 5xx
            response = error
        with response:
            return response.code, response.headers, response.read().decode("utf-8", "replace")

    def follow(self, url, data=None):
        """Request ``url`` and follow redirects; stop at the registered redirect URI.

        Returns ``(status, headers, body, url)``; at the redirect URI, status is the 3xx that
        pointed there and ``url`` is that Location.
        """
        for _ in range(10):
            status, headers, body = self.request(url, data)
            data = None
            if status not in (301, 302, 303, 307, 308):
                return status, headers, body, url
            url = urllib.parse.urljoin(url, headers["Location"])
            if url.startswith(REDIRECT_URI):
                return status, headers, body, url
        raise AssertionError("too many redirects")


def forms_of(body):
    parser = _Forms()
    parser.feed(body)
    return parser.forms, " ".join(parser.text)


def authorize_url(idp, **extra):
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": "openid profile email groups",
        "state": secrets.token_urlsafe(8),
        "nonce": secrets.token_urlsafe(8),
        **extra,
    }
    return f"{idp.issuer}/auth?{urllib.parse.urlencode(params)}", params


def open_login_form(browser, idp, **extra):
    url, params = authorize_url(idp, **extra)
    status, _, body, page_url = browser.follow(url)
    assert status == 200, body
    forms, _ = forms_of(body)
    (login,) = forms
    assert {"username", "password"} <= set(login["fields"])
    return urllib.parse.urljoin(page_url, login["action"]), params


def log_in(idp, username, password=PASSWORD, **extra):
    """The whole browser part of the code flow: returns (code, authorize params)."""
    browser = Browser()
    action, params = open_login_form(browser, idp, **extra)
    status, _, body, page_url = browser.follow(action, {"username": username, "password": password})
    assert status == 200, body
    forms, text = forms_of(body)
    assert "Authorize" in text and username in text
    (consent,) = [f for f in forms if ("decision", "approve") in f["buttons"]]
    status, _, _, url = browser.follow(urllib.parse.urljoin(page_url, consent["action"]), {"decision": "approve"})
    assert status in (302, 303) and url.startswith(REDIRECT_URI), url
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["state"] == [params["state"]]
    assert query["iss"] == [idp.issuer]
    return query["code"][0], params


def token_request(idp, code, client_id=CLIENT_ID, secret=CLIENT_SECRET, method="basic", **extra):
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, **extra}
    headers = {}
    if method == "basic":
        pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        data.update(client_id=client_id, client_secret=secret)
    status, _, body = Browser().request(f"{idp.issuer}/token", data, headers)
    return status, json.loads(body)


def b64url_decode(part):
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verified_claims(idp, id_token):
    """The ID token's payload, after checking its RS256 signature against the provider's JWKS."""
    header_b64, payload_b64, signature_b64 = id_token.split(".")
    header = json.loads(b64url_decode(header_b64))
    assert header["alg"] == "RS256"
    _, _, body = Browser().request(f"{idp.issuer}/jwks")
    (jwk,) = [k for k in json.loads(body)["keys"] if k["kid"] == header["kid"]]
    assert "d" not in jwk  # only the public half is published
    public = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(jwk["e"]), "big"), int.from_bytes(b64url_decode(jwk["n"]), "big")
    ).public_key()
    public.verify(
        b64url_decode(signature_b64),
        f"{header_b64}.{payload_b64}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    return json.loads(b64url_decode(payload_b64))


# ------------------------------------------------------------------ tests


def test_discovery_document(idp):
    status, _, body = Browser().request(idp.discovery_url)
    assert status == 200
    doc = json.loads(body)
    base = f"http://127.0.0.1:{idp.port}"
    assert doc["issuer"] == idp.issuer == base
    assert doc["authorization_endpoint"] == f"{base}/auth"
    assert doc["token_endpoint"] == f"{base}/token"
    assert doc["userinfo_endpoint"] == f"{base}/me"
    assert doc["jwks_uri"] == f"{base}/jwks"
    assert {"openid", "profile", "email", "groups"} <= set(doc["scopes_supported"])
    assert {"preferred_username", "groups", "email", "name"} <= set(doc["claims_supported"])
    assert {"client_secret_basic", "client_secret_post"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert doc["response_types_supported"] == ["code"]


def test_authorization_code_flow(idp):
    code, params = log_in(idp, "admin-syd")
    status, tokens = token_request(idp, code)
    assert status == 200, tokens
    assert tokens["token_type"].lower() == "bearer"

    claims = verified_claims(idp, tokens["id_token"])
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == CLIENT_ID
    assert claims["nonce"] == params["nonce"]
    assert claims["sub"] == "admin-syd"
    assert claims["preferred_username"] == "admin-syd"
    assert claims["name"] == "admin-syd"
    assert claims["email"] == "admin-syd@ngp.example"
    assert claims["groups"] == ["region-admin:syd"]

    status, _, body = Browser().request(
        f"{idp.issuer}/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert status == 200, body
    userinfo = json.loads(body)
    assert userinfo["sub"] == "admin-syd"
    assert userinfo["preferred_username"] == "admin-syd"
    assert userinfo["email"] == "admin-syd@ngp.example"
    assert userinfo["groups"] == ["region-admin:syd"]

    # The code is single-use.
    status, again = token_request(idp, code)
    assert status == 400 and again["error"] == "invalid_grant"


def test_client_secret_post_and_several_groups(idp):
    code, _ = log_in(idp, "lars")
    status, tokens = token_request(idp, code, method="post")
    assert status == 200, tokens
    claims = verified_claims(idp, tokens["id_token"])
    assert claims["preferred_username"] == "lars"
    assert claims["groups"] == ["project-lead", "researcher"]


def test_pkce_as_generic_oauthenticator_sends_it(idp):
    # oauthenticator 17 defaults: enable_pkce=True (S256), basic_auth=False (client_secret_post).
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    pkce = {"code_challenge": challenge, "code_challenge_method": "S256"}
    code, _ = log_in(idp, "admin-syd", **pkce)
    status, answer = token_request(idp, code, method="post", code_verifier=secrets.token_urlsafe(48))
    assert status == 400 and answer["error"] == "invalid_grant", answer
    code, _ = log_in(idp, "admin-syd", **pkce)
    status, tokens = token_request(idp, code, method="post", code_verifier=verifier)
    assert status == 200, tokens
    assert verified_claims(idp, tokens["id_token"])["groups"] == ["region-admin:syd"]


def test_id_token_signature_is_checked(idp):
    code, _ = log_in(idp, "clara")
    _, tokens = token_request(idp, code)
    header, payload, signature = tokens["id_token"].split(".")
    forged = json.loads(b64url_decode(payload)) | {"groups": ["operator"]}
    forged_b64 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidSignature):
        verified_claims(idp, f"{header}.{forged_b64}.{signature}")


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [("admin-syd", "not the password", "bad-password"), ("mallory", PASSWORD, "unknown-user")],
)
def test_bad_credentials_reshow_the_login_form(idp, username, password, reason):
    browser = Browser()
    action, _ = open_login_form(browser, idp)
    for _ in range(2):  # and again: the form stays usable
        status, _, body, url = browser.follow(action, {"username": username, "password": password})
        assert status in (200, 401), body
        assert not url.startswith(REDIRECT_URI)
        forms, text = forms_of(body)
        (login,) = forms
        assert {"username", "password"} <= set(login["fields"])
        assert login["fields"]["username"] == username
        assert "Wrong username or password" in text
    log = idp.log_path.read_text()
    assert f'login-failure user="{username}"' in log and reason in log
    assert password not in log


def test_login_success_is_logged_without_password(idp):
    log_in(idp, "clara")
    log = idp.log_path.read_text()
    assert 'login-success user="clara" client="jupyterhub"' in log
    assert PASSWORD not in log


def test_wrong_client_secret_is_refused(idp):
    code, _ = log_in(idp, "admin-syd")
    for method in ("basic", "post"):
        status, answer = token_request(idp, code, secret="not-the-secret", method=method)
        assert status == 401 and answer["error"] == "invalid_client", answer
    status, answer = token_request(idp, code, client_id="someone-else")
    assert status == 401 and answer["error"] == "invalid_client", answer


def test_unregistered_redirect_uri_is_not_followed(idp):
    url, _ = authorize_url(idp, redirect_uri="http://127.0.0.1:9/elsewhere")
    status, _, body, where = Browser().follow(url)
    assert status == 400 and "redirect_uri" in body
    assert not where.startswith("http://127.0.0.1:9/")


def test_files_are_private(idp):
    state = idp.state_path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in (idp.config_path, idp.keys_path, idp.log_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    config = json.loads(idp.config_path.read_text())
    assert config["issuer"] == idp.issuer and config["port"] == idp.port
    (jwk,) = config["jwks"]["keys"]
    assert jwk["kty"] == "RSA" and "d" in jwk


def test_keys_are_kept_across_config_rewrites(idp, tmp_path):
    other = DevIdentityProvider(state_dir=str(tmp_path / "state"), port=idp.port)
    other.write_config([], [])
    first = json.loads(other.config_path.read_text())
    other.write_config(roster_from_users([("olof", ["operator"])], "pw"), [])
    second = json.loads(other.config_path.read_text())
    assert first["jwks"] == second["jwks"] and first["cookie_keys"] == second["cookie_keys"]
    assert second["users"][0]["groups"] == ["operator"]


def test_start_failures_are_clear(idp, tmp_path):
    busy = DevIdentityProvider(state_dir=str(tmp_path / "busy"), port=idp.port)
    busy.write_config([], [])
    with pytest.raises(RuntimeError, match="in use"):
        busy.start()

    broken = DevIdentityProvider(state_dir=str(tmp_path / "broken"))
    broken.write_config([], [])
    broken.config_path.write_text("{}")  # no users, no clients: server.js throws at start
    with pytest.raises(RuntimeError, match="exited with status") as failed:
        broken.start()
    assert "TypeError" in str(failed.value)  # the log tail is in the message
    assert not broken.running


def test_roster_from_users():
    roster = roster_from_users([("admin-syd", ["region-admin:syd"]), ("olof", "operator")], "pw")
    assert roster == [
        {"username": "admin-syd", "password": "pw", "name": "admin-syd",
         "email": "admin-syd@ngp.example", "groups": ["region-admin:syd"]},
        {"username": "olof", "password": "pw", "name": "olof",
         "email": "olof@ngp.example", "groups": ["operator"]},
    ]

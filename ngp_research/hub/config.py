"""The hub's configuration, applied to JupyterHub's config object by ``hub/jupyterhub_config.py``.

Everything secret is generated on first start and kept in ``$NGP_HOME/state``
with mode 0600: the cookie secret, the proxy's token, the key that encrypts
auth state, and the OIDC client secret.

Identity: for the demo and the tests, ``NGP_OIDC_ISSUER`` points at the
development provider (``hub/idp``). In production set the same
GenericOAuthenticator options for the region's own provider (for example
Keycloak: ``{issuer}/protocol/openid-connect/auth``, ``.../token``,
``.../userinfo``), with a ``groups`` claim carrying the platform roles.
"""

import os
import sys
from pathlib import Path

from . import state

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "jupyterhub"


def configure(c, platform=None) -> None:
    platform = platform or state.platform()
    platform.ensure_layout()
    st = platform.state_dir
    ip = os.environ.get("NGP_HUB_IP", "127.0.0.1")
    port = int(os.environ.get("NGP_HUB_PORT", "8000"))
    hub_port = int(os.environ.get("NGP_HUB_API_PORT", "8081"))
    public = f"http://{ip}:{port}"

    c.JupyterHub.bind_url = f"{public}/"
    c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{hub_port}"
    c.JupyterHub.db_url = f"sqlite:///{st / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(st / "jupyterhub_cookie_secret")
    state.secret_file(st / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(st / "jupyterhub.pid")
    c.ConfigurableHTTPProxy.auth_token = state.secret_file(st / "proxy_auth_token")
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(os.environ.get('NGP_PROXY_API_PORT', '8001'))}"
    c.ConfigurableHTTPProxy.pid_file = str(st / "proxy.pid")
    c.ConfigurableHTTPProxy.command = [str(REPO / "hub" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy")]
    c.CryptKeeper.keys = [bytes.fromhex(state.secret_file(st / "jupyterhub_crypt_key"))]

    # Identity: OpenID Connect.
    issuer = os.environ.get("NGP_OIDC_ISSUER", "").rstrip("/")
    c.JupyterHub.authenticator_class = "ngp_research.hub.auth.NGPAuthenticator"
    c.Authenticator.enable_auth_state = True
    c.Authenticator.allow_all = True  # the catalog decides, in NGPAuthenticator.authenticate
    c.GenericOAuthenticator.client_id = CLIENT_ID
    c.GenericOAuthenticator.client_secret = state.secret_file(st / "oidc_client_secret")
    c.GenericOAuthenticator.oauth_callback_url = f"{public}/hub/oauth_callback"
    c.GenericOAuthenticator.login_service = "NGP identity"
    if issuer:
        c.GenericOAuthenticator.authorize_url = f"{issuer}/auth"
        c.GenericOAuthenticator.token_url = f"{issuer}/token"
        c.GenericOAuthenticator.userdata_url = f"{issuer}/me"
    c.GenericOAuthenticator.username_claim = "preferred_username"
    c.GenericOAuthenticator.scope = ["openid", "profile", "email", "groups"]

    # Workspaces: one named server per project, in a sandbox.
    c.JupyterHub.spawner_class = "ngp_research.hub.spawner.WorkspaceSpawner"
    c.JupyterHub.allow_named_servers = True
    c.JupyterHub.named_server_limit_per_user = 0
    c.JupyterHub.default_url = "/hub/home"
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = 120
    c.Spawner.http_timeout = 120
    c.JupyterHub.template_paths = [str(REPO / "hub" / "templates")]

    from .pages import projects_for, roles_for

    c.JupyterHub.template_vars = {"ngp_projects": projects_for, "ngp_roles": roles_for}

    # The audit service: a hub-managed process outside every sandbox.
    audit_port = int(os.environ.get("NGP_AUDIT_PORT", "8082"))
    service_env = {k: v for k, v in os.environ.items() if k.startswith("NGP_")}
    service_env["NGP_HOME"] = str(platform.home_path)
    c.JupyterHub.services = [{
        "name": "audit",
        "url": f"http://127.0.0.1:{audit_port}",
        "command": [sys.executable, "-m", "ngp_research.audit.service"],
        # its own socket as well as the port: the kernels' way in (see the spawner)
        "environment": dict(service_env, NGP_AUDIT_SOCKET=str(platform.audit_socket)),
        "oauth_no_confirm": True,
    }, {
        # Reports: runs templates in members' workspaces (start their servers, reach their kernels) and
        # serves the report pages. Its token is also what `ngp report run` uses on this host.
        "name": "reports",
        "url": f"http://127.0.0.1:{int(os.environ.get('NGP_REPORTS_PORT', '8083'))}",
        "command": [sys.executable, "-m", "ngp_research.reports.service"],
        "environment": dict(service_env, NGP_HUB_PUBLIC_URL=public),
        "api_token": state.secret_file(st / "reports_api_token"),
        "oauth_no_confirm": True,
    }]
    # Every user may reach the services' pages; each service decides who may read what.
    c.JupyterHub.load_roles = [
        {"name": "user", "scopes": ["self", "access:services!service=audit", "access:services!service=reports"]},
        {"name": "report-runner", "scopes": ["admin:servers", "access:servers", "read:users"],
         "services": ["reports"]},
    ]
    c.JupyterHub.cleanup_servers = True

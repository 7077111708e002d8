"""Login: OpenID Connect through oauthenticator's GenericOAuthenticator, checked against the catalog.

The identity provider says who the user is and carries role groups
(``region-admin:<region>``, ``project-lead``, ``researcher``, ...). The catalog
decides: a user it does not know, or one without any role, is refused with a
page that says so. Project membership always comes from the catalog.
"""

from oauthenticator.generic import GenericOAuthenticator
from tornado import web

from ..errors import NotFoundError
from . import state


class NGPAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator that admits only users the platform's catalog knows, with a role."""

    async def authenticate(self, handler, data=None, **kwargs):
        model = await super().authenticate(handler, data, **kwargs)
        if model is None:
            return None
        username = model["name"]
        try:
            user = state.catalog().user(username)
        except NotFoundError:
            raise web.HTTPError(
                403, f"{username} is not a user of this platform. Ask your region's Genomic Medicine Centre "
                     "or a project lead to register you."
            ) from None
        roles = user.role_labels()
        if not roles:
            raise web.HTTPError(403, f"{username} has no role on this platform (researcher, project lead, "
                                     "reviewer, region admin or operator), so there is nothing to open.")
        model["admin"] = "operator" in roles
        auth_state = model.setdefault("auth_state", {}) or {}
        auth_state["ngp_roles"] = roles
        model["auth_state"] = auth_state
        return model

    async def check_allowed(self, username, auth_model):
        # authenticate() has already refused everyone the catalog does not admit.
        return auth_model is not None

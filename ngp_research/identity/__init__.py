"""Identity: the development OpenID Connect provider the hub logs users in through (design section 6)."""

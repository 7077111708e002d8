"""The JupyterHub side: login through OpenID Connect, project workspaces as named servers.

``hub/jupyterhub_config.py`` only calls :func:`ngp_research.hub.config.configure`.
"""

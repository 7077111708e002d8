# ngp-research's hub. The logic lives in ngp_research.hub; this file only applies it.
# Run: NGP_HOME=... NGP_OIDC_ISSUER=http://127.0.0.1:5556 jupyterhub -f hub/jupyterhub_config.py
from ngp_research.hub.config import configure

configure(c)  # noqa: F821 - `c` is JupyterHub's config object

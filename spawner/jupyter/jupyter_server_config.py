"""Jupyter server configuration of every workspace. Read-only inside the sandbox; users cannot change it.

Copied at build time into the workspace environment (``<env>/etc/ngp-jupyter/``), which is bound
read-only into the sandbox, and found there through ``JUPYTER_CONFIG_DIR`` (see
``ngp_research.workspace.jupyter.singleuser_environment``). Config from user-writable places is off:
``PYTHONNOUSERSITE=1`` (no ``~/.local/etc/jupyter``), ``JUPYTER_CONFIG_DIR`` is this folder (not
``~/.jupyter``), and ``JUPYTER_DATA_DIR``/``JUPYTER_PATH`` point at the environment's read-only
``share/jupyter`` (no ``~/.local/share/jupyter``).
"""

c = get_config()  # noqa: F821 (provided by traitlets when this file is loaded)

# No shell: terminals are off (design, section 5.4).
c.ServerApp.terminals_enabled = False

# Only the platform's kernels: neither ipykernel's built-in python3 nor a kernelspec a user writes under
# their home can be started. (KernelSpecManager.kernel_dirs is not configurable: the search path is
# narrowed by JUPYTER_PATH and JUPYTER_DATA_DIR, both the environment's read-only share/jupyter, and the
# build removes every kernelspec there but ngp-python.)
# jupyter_client's own KernelSpecManager filters only the listing and starts ipykernel's python3 by name
# whatever the config says; the platform's subclass refuses every name outside allowed_kernelspecs and
# looks only in <env>/share/jupyter/kernels.
c.ServerApp.kernel_spec_manager_class = "ngp_research.workspace.jupyter.WorkspaceKernelSpecManager"
c.KernelSpecManager.allowed_kernelspecs = {"ngp-python"}
c.KernelSpecManager.ensure_native_kernel = False
c.MappingKernelManager.default_kernel_name = "ngp-python"

# The file browser starts at /, whose listing shows only /data, /project and /home (the system folders
# are still reachable by path, all read-only); JupyterLab opens in /project.
c.ServerApp.root_dir = "/"
c.ServerApp.contents_manager_class = "ngp_research.workspace.jupyter.WorkspaceContentsManager"
c.FileContentsManager.preferred_dir = "/project"
c.FileContentsManager.delete_to_trash = False
c.ContentsManager.allow_hidden = False

# No server extensions but JupyterLab (and, under the hub, jupyterhub-singleuser, which is not an
# extension that can be switched off here). Anything else an install enabled is switched off.
c.ServerApp.jpserver_extensions = {
    "jupyterlab": True,
    "jupyter_lsp": False,
    "jupyter_server_terminals": False,
    "notebook_shim": False,
    "notebook": False,
    "nbclassic": False,
    "voila": False,
    "jupyter_server_fileid": False,
    "jupyter_server_ydoc": False,
    "jupyter_collaboration": False,
    "jupyter_server_proxy": False,
}

# Never root; never open a browser; no tokens printed to logs in URLs.
c.ServerApp.allow_root = False
c.ServerApp.open_browser = False
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.news_url = None
c.LabServerApp.extension_manager = "readonly"

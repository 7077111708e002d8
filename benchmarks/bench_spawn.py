"""Time from a spawn request to a kernel answering: ngp's sandboxed WorkspaceSpawner vs plain JupyterHub.

Both hubs run in the same run on 127.0.0.1, with the same single-user server
(from the workspace environment) and the same kernel. The peer is JupyterHub's
own LocalProcessSpawner with the DummyAuthenticator (the member is a system
user made for the benchmark). Measured per start: POST /hub/api/users/U/servers/S,
wait until ready, start a kernel and get the reply to ``1 + 1``.

    python benchmarks/bench_spawn.py [--repeat N]      (root: the sandbox drops to members' uids)
"""

import argparse
import asyncio
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ngp_research.catalog import Catalog  # noqa: E402
from ngp_research.demo.seed import seed_demo  # noqa: E402
from ngp_research.hub.launcher import DEMO_PASSWORD, PlatformProcesses, free_port  # noqa: E402
from ngp_research.platform import Platform  # noqa: E402
from ngp_research.workspace.environment import default_workspace_env  # noqa: E402
from tests.hubclient import Browser, hub_api, log_in, run_code, wait_until_ready  # noqa: E402

PEER_USER = "ngpbench"


def time_spawn(url, browser, token, user, server):
    t = time.perf_counter()
    path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
    status, model = hub_api(browser, url, path, method="POST", token=token)
    assert status in (201, 202), (status, model)
    s = wait_until_ready(browser, url, user, server, token, timeout=180)
    out = asyncio.run(run_code(url + s["url"], token, "print(1 + 1)", kernel=KERNEL[server]))
    elapsed = time.perf_counter() - t
    assert out.strip() == "2", out
    hub_api(browser, url, path, method="DELETE", token=token)
    for _ in range(100):
        _, model = hub_api(browser, url, f"/users/{user}", token=token)
        if server not in (model.get("servers") or {}):
            break
        time.sleep(0.2)
    return elapsed


KERNEL = {"cardio-gwas": "ngp-python", "": "python3"}


def peer_hub(base: Path, env_path: str):
    """Plain JupyterHub: DummyAuthenticator + LocalProcessSpawner, same single-user server."""
    try:
        pwd.getpwnam(PEER_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", PEER_USER], check=True)
    port, api_port, proxy_port = free_port(), free_port(), free_port()
    cfg = base / "peer_config.py"
    cfg.write_text(f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{port}/"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_port}"
c.ConfigurableHTTPProxy.command = ["{ROOT}/hub/proxy/node_modules/.bin/configurable-http-proxy"]
c.JupyterHub.db_url = "sqlite:///{base}/peer.sqlite"
c.JupyterHub.cookie_secret_file = "{base}/peer_cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "{DEMO_PASSWORD}"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = ["{env_path}/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {{"JUPYTER_PATH": "{env_path}/share/jupyter"}}
""")
    log = open(base / "peer.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(cfg)], cwd=str(base), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            b = Browser()
            if b.request(f"{url}/hub/api")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.3)
    return proc, url


def peer_login(url):
    b = Browser()
    status, body, _ = b.follow(f"{url}/hub/login")
    b.request(f"{url}/hub/login", {"username": PEER_USER, "password": DEMO_PASSWORD,
                                   "_xsrf": b.cookie("_xsrf") or ""})
    status, model = hub_api(b, url, f"/users/{PEER_USER}/tokens", method="POST", body={"note": "bench"})
    return b, model["token"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench_spawn needs root: the sandbox drops to each member's own uid")
    env_path = default_workspace_env()
    base = Path(tempfile.mkdtemp(prefix="ngp-bench-spawn-"))
    os.chmod(base, 0o711)
    platform = Platform(home=str(base / "ngp"))
    seed_demo(platform, samples_per_region=5, variants=60)
    catalog = Catalog.open(platform)
    procs = PlatformProcesses(platform, hub_port=0, idp_port=0, workspace_env=env_path)
    peer = None
    ours, theirs = [], []
    try:
        procs.start(catalog)
        browser, _, _, _ = log_in(procs.url, "alice", DEMO_PASSWORD)
        _, model = hub_api(browser, procs.url, "/users/alice/tokens", method="POST", body={"note": "bench"})
        token = model["token"]
        peer, peer_url = peer_hub(base, env_path)
        pb, ptoken = peer_login(peer_url)
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            ours.append(time_spawn(procs.url, browser, token, "alice", "cardio-gwas"))
            theirs.append(time_spawn(peer_url, pb, ptoken, PEER_USER, ""))
    finally:
        procs.stop()
        catalog.close()
        if peer is not None:
            os.killpg(peer.pid, 15)
            peer.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "repeat": args.repeat,
        "ngp_spawn_to_kernel_s": statistics.median(ours),
        "plain_jupyterhub_spawn_to_kernel_s": statistics.median(theirs),
        "all_ngp_s": ours,
        "all_plain_s": theirs,
    }
    result["ratio_ngp_over_plain"] = result["ngp_spawn_to_kernel_s"] / result["plain_jupyterhub_spawn_to_kernel_s"]
    print(f"spawn request to a kernel answering, median of {args.repeat}:")
    print(f"  ngp WorkspaceSpawner (bwrap sandbox, bridges, cgroups): {result['ngp_spawn_to_kernel_s']:6.2f} s")
    print(f"  plain JupyterHub LocalProcessSpawner:                   "
          f"{result['plain_jupyterhub_spawn_to_kernel_s']:6.2f} s")
    print(f"  ratio (ngp / plain):                                    {result['ratio_ngp_over_plain']:6.2f}x")
    return save(args.out, result)


if __name__ == "__main__":
    main()

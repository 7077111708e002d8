"""The hub end to end: the real identity provider, JupyterHub with its proxy, project workspaces.

One platform (seeded demo) runs for the whole module on free 127.0.0.1 ports.
Users log in through the provider's real login and consent forms.
"""

import asyncio
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from ngp_research.catalog import Catalog
from ngp_research.demo.seed import seed_demo
from ngp_research.hub.launcher import DEMO_PASSWORD, PlatformProcesses
from ngp_research.platform import Platform

from .hubclient import Page, hub_api, log_in


@pytest.fixture(scope="module")
def platform_up():
    base = tempfile.mkdtemp(prefix="ngp-hub-")
    os.chmod(base, 0o711)
    platform = Platform(home=os.path.join(base, "ngp"))
    seed_demo(platform, samples_per_region=5, variants=60)
    catalog = Catalog.open(platform)
    catalog.add_user("norole", "syd", [])
    procs = PlatformProcesses(platform, hub_port=0, idp_port=0,
                              extra_users=[("mallory", ["researcher"])])
    try:
        procs.start(catalog)
        yield procs, catalog
    finally:
        procs.stop()
        catalog.close()
        shutil.rmtree(base, ignore_errors=True)


def test_secrets_are_generated_and_private(platform_up):
    procs, _ = platform_up
    st = procs.platform.state_dir
    for name in ("jupyterhub_cookie_secret", "proxy_auth_token", "jupyterhub_crypt_key", "oidc_client_secret"):
        assert (st / name).stat().st_mode & 0o777 == 0o600, name


def test_researcher_logs_in_through_the_provider_and_sees_her_projects(platform_up):
    procs, _ = platform_up
    browser, status, body, url = log_in(procs.url, "alice", DEMO_PASSWORD)
    assert status == 200 and urllib.parse.urlsplit(url).path == "/hub/home", (status, url, body[:300])
    text = Page(body).text
    for expected in ("cardio-gwas", "rare-disease", "legacy-study", "norr-cohort", "syd-cohort",
                     "expired on 2023-12-31", "ost-cohort (ost): tag revoked"):
        assert expected in text, expected
    assert "bob" not in text.split("Signed in as")[0]


@pytest.mark.parametrize("user, message", [
    ("mallory", "mallory is not a user of this platform"),
    ("norole", "norole has no role on this platform"),
])
def test_users_the_catalog_does_not_admit_are_refused_with_a_clear_page(platform_up, user, message):
    procs, _ = platform_up
    _, status, body, _ = log_in(procs.url, user, DEMO_PASSWORD)
    assert status == 403 and message in Page(body).text


def test_wrong_password_never_reaches_the_hub(platform_up):
    procs, _ = platform_up
    browser, status, body, url = log_in(procs.url, "alice", "wrong")
    assert "Wrong username or password" in Page(body).text
    assert browser.cookie("jupyterhub-session-id") is None or not url.startswith(procs.url)


@pytest.mark.parametrize("user, project, reason", [
    ("bob", "cardio-gwas", "bob is not a member of project 'cardio-gwas'"),
    ("alice", "legacy-study", "expired on 2023-12-31"),
])
def test_spawn_page_refuses_with_the_policys_reason(platform_up, user, project, reason):
    procs, _ = platform_up
    browser, status, _, _ = log_in(procs.url, user, DEMO_PASSWORD)
    assert status == 200
    status, body, _ = browser.follow(f"{procs.url}/hub/spawn/{user}/{project}")
    assert status == 200 and reason in Page(body).text
    form = Page(body).forms[0]
    status, _, body = browser.request(urllib.parse.urljoin(f"{procs.url}/hub/spawn/{user}/{project}",
                                                           form["action"]), form["fields"])
    assert status == 403 and reason in Page(body).text


# -- workspaces: started through the hub, attacked from a kernel ---------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="workspaces need root (to drop to the member's uid) and bubblewrap")

PROBE = r'''
import ctypes, json, os, socket
R = {}
P = json.loads(PARAMS)
def absent(p):
    try:
        os.stat(p); return False
    except OSError:
        return True
R["sees_exactly_the_tagged_files"] = sorted(os.path.join(d, f) for d, _, fs in os.walk("/data") for f in fs)
R["reads_a_tagged_file"] = open(P["tagged"], "rb").read(2) == b"\x1f\x8b"
R["untagged_dataset_hidden"] = all(absent(p) for p in P["untagged"])
R["other_region_area_hidden"] = absent("/data/vast") and absent(P["regions_dir"])
R["other_project_area_hidden"] = absent(P["other_project"])
R["platform_state_hidden"] = absent(P["state_dir"]) and absent(P["hub_db"]) and absent(P["cookie_secret"])
R["root_and_host_homes_hidden"] = absent("/root") and sorted(os.listdir("/home")) == [P["user"]]
def cannot_write(p):
    try:
        open(p, "ab").close(); return False
    except OSError:
        return True
R["data_not_writable"] = cannot_write(P["tagged"]) and cannot_write("/data/new-file")
libc = ctypes.CDLL(None, use_errno=True)
R["data_not_remountable"] = libc.mount(None, P["tagged"].encode(), None, ctypes.c_ulong(32 | 4096), None) != 0
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
R["no_capabilities"] = all(int(status[k].strip(), 16) == 0 for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb"))
def reachable(port):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port)); return True
    except OSError:
        return False
    finally:
        s.close()
R["proxy_api_unreachable"] = not reachable(P["proxy_api_port"])
R["other_users_server_unreachable"] = all(not reachable(p) for p in P["other_server_ports"])
R["hub_public_port_unreachable"] = not reachable(P["hub_port"])
R["hub_api_reachable_through_the_bridge"] = reachable(P["hub_api_port"])
R["uid"] = os.getuid()
print(json.dumps(R))
'''


def _token(browser, url, user):
    status, model = hub_api(browser, url, f"/users/{user}/tokens", method="POST", body={"note": "e2e test"})
    assert status in (200, 201), (status, model)
    return model["token"]


def _proxy_routes(procs):
    import json as _json
    import urllib.request as _rq

    token = (procs.platform.state_dir / "proxy_auth_token").read_text().strip()
    req = _rq.Request(f"http://127.0.0.1:{procs.proxy_api_port}/api/routes", headers={"Authorization": f"token {token}"})
    with _rq.urlopen(req, timeout=10) as r:
        return _json.loads(r.read())


def _start(procs, browser, token, user, project):
    from .hubclient import wait_until_ready

    status, model = hub_api(browser, procs.url, f"/users/{user}/servers/{project}", method="POST", token=token)
    assert status in (201, 202), (status, model, procs.log_tail())
    return wait_until_ready(browser, procs.url, user, project, token)


@pytest.fixture(scope="module")
def alice_workspace(platform_up):
    procs, catalog = platform_up
    browser, status, _, _ = log_in(procs.url, "alice", DEMO_PASSWORD)
    assert status == 200
    token = _token(browser, procs.url, "alice")
    server = _start(procs, browser, token, "alice", "cardio-gwas")
    clara, _, _, _ = log_in(procs.url, "clara", DEMO_PASSWORD)
    clara_token = _token(clara, procs.url, "clara")
    _start(procs, clara, clara_token, "clara", "cardio-gwas")
    routes = _proxy_routes(procs)
    clara_port = int(urllib.parse.urlsplit(routes["/user/clara/cardio-gwas"]["target"]).port)
    platform = procs.platform
    params = {
        "tagged": "/data/syd/syd-cohort/syd-cohort.vcf.gz",
        "untagged": ["/data/vast/vast-cohort", str(platform.dataset_dir("vast", "vast-cohort"))],
        "regions_dir": str(platform.regions_dir),
        "other_project": str(platform.projects_dir / "rare-disease"),
        "state_dir": str(platform.state_dir),
        "hub_db": str(platform.state_dir / "jupyterhub.sqlite"),
        "cookie_secret": str(platform.state_dir / "jupyterhub_cookie_secret"),
        "user": "alice",
        "proxy_api_port": procs.proxy_api_port,
        "other_server_ports": [clara_port],
        "hub_port": procs.hub_port,
        "hub_api_port": 8081,  # the bridge's end inside the sandbox
    }
    import json as _json

    code = f"PARAMS = {_json.dumps(_json.dumps(params))}\n" + PROBE
    from .hubclient import run_code

    out = asyncio.run(run_code(procs.url + server["url"], token, code))
    return {"results": _json.loads(out.strip().splitlines()[-1]), "browser": browser, "token": token,
            "server": server}


EXPECTED_TAGGED = sorted(f"/data/{r}/{r}-cohort/{name}" for r in ("norr", "uppsala", "stockholm", "syd")
                         for name in (f"{r}-cohort.vcf.gz", f"{r}-cohort.vcf.gz.tbi", f"{r}-phenopackets.json"))


@needs_root
def test_kernel_sees_exactly_the_tagged_files(alice_workspace):
    assert alice_workspace["results"]["sees_exactly_the_tagged_files"] == EXPECTED_TAGGED


@needs_root
@pytest.mark.parametrize("check", [
    "reads_a_tagged_file", "untagged_dataset_hidden", "other_region_area_hidden", "other_project_area_hidden",
    "platform_state_hidden", "root_and_host_homes_hidden", "data_not_writable", "data_not_remountable",
    "no_capabilities", "proxy_api_unreachable", "other_users_server_unreachable", "hub_public_port_unreachable",
    "hub_api_reachable_through_the_bridge",
])
def test_kernel_cannot_escape(alice_workspace, check):
    assert alice_workspace["results"][check] is True


@needs_root
def test_kernel_runs_as_alices_own_uid(alice_workspace, platform_up):
    _, catalog = platform_up
    assert alice_workspace["results"]["uid"] == catalog.workspace_identity("alice", "cardio-gwas")[0]


@needs_root
def test_start_and_stop_are_audited(alice_workspace, platform_up):
    _, catalog = platform_up
    starts = catalog.audit.records(action="workspace.start", actor="alice")
    assert starts and starts[-1].project == "cardio-gwas"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"


def _sign_in(page, url, user):
    """Open ``url`` in Chromium and sign in as ``user`` through the provider's login and consent pages."""
    page.set_default_timeout(120_000)
    page.goto(url)
    page.click("text=Sign in with NGP identity")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.click("button[value=approve]")


@needs_root
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it)")
def test_browser_logs_in_starts_a_workspace_and_sees_the_tagged_data(platform_up, alice_workspace):
    """Headless Chromium: the provider's login, the home page, the spawn form, JupyterLab's /data."""
    from playwright.sync_api import sync_playwright

    procs, _ = platform_up
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            _sign_in(page, f"{procs.url}/hub/login", "lars")
            page.wait_for_url("**/hub/home")
            home = page.inner_text("#ngp-projects")
            assert "cardio-gwas" in home and "syd-cohort" in home
            page.screenshot(path=str(OUTPUT / "hub-home.png"), full_page=True)
            page.click("tr[data-project=cardio-gwas] a.ngp-start")
            page.wait_for_selector("#ngp-datasets")
            assert "stockholm-cohort" in page.inner_text("#ngp-datasets")
            page.click("#spawn_form button[type=submit]")
            page.wait_for_url("**/user/lars/cardio-gwas/lab**", timeout=180_000)
            page.goto(f"{procs.url}/user/lars/cardio-gwas/lab/tree/data")
            page.wait_for_selector(".jp-DirListing-item[title*='syd']", timeout=180_000)
            listing = page.inner_text(".jp-DirListing-content")
            for region in ("norr", "stockholm", "syd", "uppsala"):
                assert region in listing
            for region in ("vast", "orebro", "ost"):
                assert region not in listing
            page.screenshot(path=str(OUTPUT / "jupyterlab-data.png"), full_page=True)
        finally:
            browser.close()
    assert (OUTPUT / "jupyterlab-data.png").stat().st_size > 10_000
    listed = [r for r in platform_up[1].audit.records(action="server.file", actor="lars")
              if r.detail.get("operation") == "list"]
    assert any(r.path == "/data" and r.project == "cardio-gwas" for r in listed)


@needs_root
def test_the_admin_api_shows_each_workspaces_profile_and_data(alice_workspace, platform_up):
    procs, _ = platform_up
    status, _ = hub_api(alice_workspace["browser"], procs.url, "/users/clara", token=alice_workspace["token"])
    assert status in (403, 404)  # alice may not read clara's servers; the operator (hub admin) can
    olof, status, _, _ = log_in(procs.url, "olof", DEMO_PASSWORD)
    token = _token(olof, procs.url, "olof")
    status, model = hub_api(olof, procs.url, "/users/clara", token=token)
    assert status == 200 and model["admin"] is False
    options = model["servers"]["cardio-gwas"]["user_options"]
    assert options["profile"] == {"cpu": 2.0, "memory": "8G", "idle_timeout": 3600}
    assert "syd/syd-cohort" in options["datasets"]


@needs_root
def test_removing_a_member_stops_their_running_workspace(alice_workspace, platform_up):
    import time

    procs, catalog = platform_up
    olof, _, _, _ = log_in(procs.url, "olof", DEMO_PASSWORD)
    token = _token(olof, procs.url, "olof")
    _, model = hub_api(olof, procs.url, "/users/clara", token=token)
    assert "cardio-gwas" in model["servers"]
    catalog.remove_member("cardio-gwas", "clara", actor="lars")
    deadline = time.time() + 60
    while time.time() < deadline:
        _, model = hub_api(olof, procs.url, "/users/clara", token=token)
        if "cardio-gwas" not in model.get("servers", {}):
            break
        time.sleep(1)
    else:
        raise AssertionError("clara's workspace kept running after she was removed")
    stop = catalog.audit.records(action="workspace.stop", actor="clara")[-1]
    assert "clara is not a member" in str(stop.detail)


POST_FROM_KERNEL = r'''
import json, os, urllib.request
body = json.dumps({"records": [{"action": "data.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz",
                                "user": "bob", "detail": {"msg_id": "e2e-1", "region": "chr1:1-1000"}}]}).encode()
req = urllib.request.Request(os.environ["NGP_AUDIT_URL"] + "records", data=body, method="POST",
                             headers={"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]})
print(urllib.request.urlopen(req, timeout=30).read().decode())
'''


@needs_root
def test_a_kernel_reaches_the_audit_service_and_the_token_decides_who_it_is(alice_workspace, platform_up):
    import json as _json

    from .hubclient import run_code

    procs, catalog = platform_up
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"],
                               POST_FROM_KERNEL))
    ack = _json.loads(out.strip().splitlines()[-1])
    assert ack["acknowledged"] == 1
    (rec,) = [r for r in catalog.audit.records(action="data.open") if r.seq == ack["first_seq"]]
    assert (rec.actor, rec.project, rec.region, rec.dataset) == ("alice", "cardio-gwas", "syd", "syd-cohort")
    assert "payload claimed user 'bob'" in rec.detail["flag"]
    # Kernels use the service's own socket, its folder bound read-only; the hub relays no audit record.
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"],
                               "import os, stat\np = os.environ['NGP_AUDIT_SOCKET']\n"
                               "print(p, stat.S_ISSOCK(os.stat(p).st_mode), os.listdir('/run/ngp'))"))
    assert out.startswith("/run/ngp/audit/audit.sock True"), out
    assert "'audit.sock'" not in out, out
    assert procs.platform.audit_socket.is_socket()


@needs_root
def test_a_region_admin_reads_the_report_page_behind_hub_login(alice_workspace, platform_up):
    import json as _json

    procs, _ = platform_up
    admin, status, _, _ = log_in(procs.url, "admin-syd", DEMO_PASSWORD)
    assert status == 200
    status, body, _ = admin.follow(f"{procs.url}/services/audit/report")
    assert status == 200, body[:500]
    text = Page(body).text
    assert "Access report for region syd" in text and "syd-cohort" in text and "alice" in text
    assert "norr-cohort" not in text
    status, body, _ = admin.follow(f"{procs.url}/services/audit/report?format=json&since=2000-01-01&until=2100-01-01")
    assert status == 200 and _json.loads(body) and all(r["region"] == "syd" for r in _json.loads(body))
    status, body, _ = admin.follow(f"{procs.url}/services/audit/report?format=json&until=2000-01-01")
    assert status == 200 and _json.loads(body) == []
    status, body, _ = admin.follow(f"{procs.url}/services/audit/report?since=last-week")
    assert status == 400 and "since: 'last-week' is not a date or time" in Page(body).text
    status, body, _ = admin.follow(f"{procs.url}/services/audit/report?region=norr")
    assert status == 403 and "not an admin of region 'norr'" in Page(body).text
    alice, _, _, _ = log_in(procs.url, "alice", DEMO_PASSWORD)
    status, body, _ = alice.follow(f"{procs.url}/services/audit/report")
    assert status == 403 and "not a region admin" in Page(body).text


ACCESS_CELL = r'''
import os, pathlib, subprocess, pysam
f = "/data/syd/syd-cohort/syd-cohort.vcf.gz"
open(f, "rb").read(2)
os.close(os.open("/data/norr/norr-cohort/norr-cohort.vcf.gz", os.O_RDONLY))
pathlib.Path("/data/uppsala/uppsala-cohort/uppsala-phenopackets.json").read_bytes()
os.listdir("/data/stockholm/stockholm-cohort")
subprocess.run(["cat", "/data/syd/syd-cohort/syd-phenopackets.json"], capture_output=True)
sum(1 for _ in pysam.VariantFile(f).fetch("chr1", 1, 50000))
folder = os.open("/data/stockholm/stockholm-cohort", os.O_RDONLY)  # a file through an open folder ...
open(f"/dev/fd/{folder}/stockholm-cohort.vcf.gz", "rb").read(2)
os.close(folder)
here = os.getcwd()
os.chdir("/data/uppsala/uppsala-cohort")  # ... and through the working folder, named in /proc
open("/proc/self/cwd/uppsala-cohort.vcf.gz", "rb").read(2)
os.chdir(here)
print("done")
'''


@needs_root
def test_every_access_path_leaves_a_record_with_user_project_dataset_region_and_code(alice_workspace, platform_up):
    from .hubclient import run_code

    procs, catalog = platform_up
    before = catalog.audit.records()[-1].seq if catalog.audit.records() else 0
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"], ACCESS_CELL))
    assert out.strip() == "done"
    new = [r for r in catalog.audit.records() if r.seq > before and r.actor == "alice"]
    (query,) = [r for r in new if r.action == "query.execute" and "pysam.VariantFile" in (r.detail.get("code") or "")]
    caused = [a for r in new if r.detail.get("msg_id") == query.detail["msg_id"] and r.action != "query.execute"
              for a in r.accesses()]
    assert all(r.project == "cardio-gwas" for r in caused)
    assert query.seq < min(r.seq for r in caused)  # the code was recorded before anything it did
    seen = {(r.action, r.path, r.region, r.dataset) for r in caused}
    for expected in [
        ("file.open", "/data/syd/syd-cohort/syd-cohort.vcf.gz", "syd", "syd-cohort"),
        ("file.open", "/data/norr/norr-cohort/norr-cohort.vcf.gz", "norr", "norr-cohort"),
        ("file.open", "/data/uppsala/uppsala-cohort/uppsala-phenopackets.json", "uppsala", "uppsala-cohort"),
        ("file.list", "/data/stockholm/stockholm-cohort", "stockholm", "stockholm-cohort"),
        # through /dev/fd and /proc/self/cwd: the kernel records where they lead
        ("file.open", "/data/stockholm/stockholm-cohort/stockholm-cohort.vcf.gz", "stockholm", "stockholm-cohort"),
        ("file.open", "/data/uppsala/uppsala-cohort/uppsala-cohort.vcf.gz", "uppsala", "uppsala-cohort"),
        ("data.open", "/data/syd/syd-cohort/syd-cohort.vcf.gz", "syd", "syd-cohort"),
        # cat opens the file outside Python: its start is recorded under the file it was given
        ("process.exec", "/data/syd/syd-cohort/syd-phenopackets.json", "syd", "syd-cohort"),
    ]:
        assert expected in seen, expected
    assert any(r.action == "process.exec" and "cat" in str(r.detail) for r in caused)
    assert any(r.action == "data.open" and r.detail.get("start") == 1 for r in caused)


COHORT_CELL = """
from ngp_research.cohort import Cohort
cohort = Cohort.from_workspace(datasets=["syd-cohort", "norr-cohort"], workers=1, progress=False, hail_memory="1g")
freq = cohort.allele_frequencies(by="region")
opened = cohort.client.submit(lambda p: len(open(p, "rb").read(16)),
                              "/data/uppsala/uppsala-cohort/uppsala-phenopackets.json").result()


def more_reads_in_the_jvm():  # in the worker, whose Hail and Spark read files in their JVM
    from ngp_research.cohort.engine import hail
    hl = hail()
    header = hl.get_vcf_metadata("/data/syd/syd-cohort/syd-cohort.vcf.gz")
    lines = hl.spark_context().textFile("/data/uppsala/uppsala-cohort/uppsala-phenopackets.json").count()
    return isinstance(header, dict) and lines > 0


assert cohort.client.submit(more_reads_in_the_jvm).result()
cohort.close()
print(len(freq), sorted(c for c in freq.columns if c.startswith("af")), opened)
"""


@needs_root
def test_cohort_in_a_workspace_hail_and_dask_workers_leave_records_of_the_cell(alice_workspace, platform_up):
    """Hail's import_vcf and a Dask worker's open, in workers the kernel started, are recorded for its cell."""
    from .hubclient import run_code

    procs, catalog = platform_up
    before = catalog.audit.records()[-1].seq
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"], COHORT_CELL,
                               timeout=400))
    assert out.strip().splitlines()[-1] == "60 ['af', 'af_norr', 'af_syd'] 16"
    new = [r for r in catalog.audit.records() if r.seq > before]
    (query,) = [r for r in new if r.action == "query.execute" and "Cohort.from_workspace" in (r.detail.get("code") or "")]
    mine = [a for r in new if r.detail.get("msg_id") == query.detail["msg_id"] and r.action != "query.execute"
            for a in r.accesses()]
    assert all((r.actor, r.project) == ("alice", "cardio-gwas") for r in mine)
    assert query.seq < min(r.seq for r in mine)
    hail = [r for r in mine if r.action == "data.open" and r.detail.get("entry_point") == "import_vcf"]
    assert {(r.path, r.region, r.dataset) for r in hail} == {
        ("/data/syd/syd-cohort/syd-cohort.vcf.gz", "syd", "syd-cohort"),
        ("/data/norr/norr-cohort/norr-cohort.vcf.gz", "norr", "norr-cohort")}
    # uppsala's file was opened only by the Dask worker's task: the worker ran the hook, for this cell
    assert ("file.open", "/data/uppsala/uppsala-cohort/uppsala-phenopackets.json", "uppsala") in {
        (r.action, r.path, r.region) for r in mine}
    assert any(r.action == "data.open" and r.detail.get("via") == "ngp_research.cohort" for r in mine)
    # real Hail and Spark in the worker: other readers record their files too, under the cell
    jvm = {(r.detail.get("entry_point"), r.path, r.region) for r in mine if r.action == "data.open"}
    assert ("get_vcf_metadata", "/data/syd/syd-cohort/syd-cohort.vcf.gz", "syd") in jvm, jvm
    assert ("SparkContext.textFile", "/data/uppsala/uppsala-cohort/uppsala-phenopackets.json", "uppsala") in jvm, jvm
    assert not [r for r in new if r.action == "audit.tamper"]


@needs_root
def test_the_cohort_tutorial_runs_in_a_workspace_and_finds_the_planted_variants(alice_workspace, platform_up):
    import json as _json

    from .hubclient import run_code

    procs, _ = platform_up
    notebook = _json.loads((Path(__file__).parents[1] / "notebooks" / "tutorial-cohort.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"], code,
                               timeout=500))
    planted = _json.loads((procs.platform.home_path / "planted.json").read_text())["planted"]
    found = next(line for line in out.splitlines() if line.startswith("candidate variants:"))
    assert found.split(":", 1)[1].split() == sorted(p["id"] for p in planted)


TEST_TEMPLATES = Path(__file__).parent / "data" / "reports"


@needs_root
def test_a_report_runs_in_the_members_workspace_with_the_audited_kernel_and_records_provenance(alice_workspace,
                                                                                              platform_up, monkeypatch):
    import hashlib
    import json as _json

    from ngp_research.cli import main as ngp
    from ngp_research.reports.runner import HubSession, find_run, plan_report, run_report

    procs, catalog = platform_up
    before = catalog.audit.records()[-1].seq
    plan = plan_report("hello", "cardio-gwas", "alice", {"repeat": "3"}, templates_dir=TEST_TEMPLATES)
    shown = []
    run_report(catalog, plan, HubSession.from_platform(procs.platform), echo=shown.append)
    assert "Executing" in "".join(shown)  # papermill's progress, streamed while it ran
    run_dir = procs.platform.projects_dir / "cardio-gwas" / "shared" / plan.relative_dir
    notebook = _json.loads((run_dir / "report.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "hej hej hej" in text and "datasets: norr-cohort stockholm-cohort syd-cohort uppsala-cohort" in text
    assert (run_dir / "report.ipynb").stat().st_uid == catalog.workspace_identity("alice", "cardio-gwas")[0]
    page = (run_dir / "report.html").read_text()
    assert 'id="ngp-provenance"' in page and plan.template_sha256 in page
    assert "manifest = json.load" not in page  # the clinician's view hides the code
    # provenance: template hash, parameters, inputs with checksums, user, outputs' hashes
    recorded = find_run(catalog, plan.run)
    assert recorded["outputs"] == {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
                                   for name in ("report.ipynb", "report.html")}
    assert recorded["parameters"] == {"repeat": 3} and recorded["user"] == "alice"
    assert recorded["template_sha256"] == hashlib.sha256((TEST_TEMPLATES / "hello.ipynb").read_bytes()).hexdigest()
    syd = next(d for d in recorded["inputs"] if d["dataset"] == "syd-cohort")
    assert all(len(f["sha256"]) == 64 for f in syd["files"])
    # the report's own cells went through alice's audited kernel, before they ran
    new = [r for r in catalog.audit.records() if r.seq > before]
    cells = [r for r in new if r.action == "query.execute" and "manifest = json.load" in (r.detail.get("code") or "")]
    assert cells and all((r.actor, r.project) == ("alice", "cardio-gwas") for r in cells)
    assert any(r.action == "file.open" and r.dataset == "norr-cohort" and r.detail.get("msg_id") ==
               cells[0].detail["msg_id"] for r in new)
    monkeypatch.setenv("NGP_HOME", str(procs.platform.home_path))
    assert ngp(["report", "show", plan.run]) == 0
    assert ngp(["audit", "verify"]) == 0


@needs_root
def test_report_parameters_and_membership_are_checked_before_anything_runs(alice_workspace, platform_up, capsys,
                                                                           monkeypatch):
    from ngp_research.cli import main as ngp

    procs, catalog = platform_up
    monkeypatch.setenv("NGP_HOME", str(procs.platform.home_path))
    before = catalog.audit.records()[-1].seq
    reports = procs.platform.projects_dir / "cardio-gwas" / "shared" / "reports"
    existing = sorted(reports.rglob("*")) if reports.exists() else []
    capsys.readouterr()
    assert ngp(["report", "run", "no-such-template", "--project", "cardio-gwas", "--as", "alice"]) == 2
    assert "template: no report template 'no-such-template'" in capsys.readouterr().err
    for template in ("variant-review", "cohort-summary"):
        assert ngp(["report", "run", template, "--project", "cardio-gwas", "--as", "alice", "-p", "bogus=1"]) == 2
        assert "bogus: not a parameter of this template" in capsys.readouterr().err
        assert ngp(["report", "run", template, "--project", "cardio-gwas", "--as", "alice",
                    "-p", "min_count=many"]) == 2
        assert "min_count: expected an int" in capsys.readouterr().err
    # bob is not a member of cardio-gwas: the access policy's reason, nothing started
    assert ngp(["report", "run", "variant-review", "--project", "cardio-gwas", "--as", "bob"]) == 2
    assert "not a member" in capsys.readouterr().err
    assert (sorted(reports.rglob("*")) if reports.exists() else []) == existing
    assert not [r for r in catalog.audit.records() if r.seq > before and r.action in ("report.run", "query.execute")]


def _planted_carriers(platform, regions=("norr", "stockholm", "syd", "uppsala")):
    """(sample, variant id) of every carrier of a planted variant in the project's regions, from the VCFs."""
    import json as _json

    import pysam

    planted = {p["id"] for p in _json.loads((platform.home_path / "planted.json").read_text())["planted"]}
    pairs = set()
    for region in regions:
        path = next(platform.dataset_dir(region, f"{region}-cohort").glob("*.vcf.gz"))
        with pysam.VariantFile(str(path)) as vcf:
            for rec in vcf:
                if rec.id in planted:
                    pairs |= {(name, rec.id) for name, s in rec.samples.items() if any(a for a in s["GT"] if a)}
    return planted, pairs


@needs_root
@pytest.mark.parametrize("template", ["variant-review", "cohort-summary"])
def test_each_template_runs_on_the_demo_project_through_ngp_report_run(alice_workspace, platform_up, monkeypatch,
                                                                       capsys, template):
    import csv
    import json as _json

    from ngp_research.cli import main as ngp

    procs, catalog = platform_up
    monkeypatch.setenv("NGP_HOME", str(procs.platform.home_path))
    capsys.readouterr()
    assert ngp(["report", "run", template, "--project", "cardio-gwas", "--as", "alice", "--json"]) == 0
    out = capsys.readouterr().out
    provenance = _json.loads(out)
    run_dir = procs.platform.projects_dir / "cardio-gwas" / "shared" / provenance["folder"].removeprefix("/project/")
    notebook = _json.loads((run_dir / "report.ipynb").read_text())
    errors = [o for c in notebook["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (run_dir / "report.html").stat().st_size > 1000
    assert provenance["status"] == "ok" and set(provenance["outputs"]) == {"report.ipynb", "report.html"}
    # the same inputs give the same numbers: a second run writes byte-identical result tables
    assert ngp(["report", "run", template, "--project", "cardio-gwas", "--as", "alice", "--json"]) == 0
    again = _json.loads(capsys.readouterr().out)
    again_dir = procs.platform.projects_dir / "cardio-gwas" / "shared" / again["folder"].removeprefix("/project/")
    assert again_dir != run_dir
    tables = sorted(p.name for p in (run_dir / "results").glob("*.tsv"))
    assert tables and tables == sorted(p.name for p in (again_dir / "results").glob("*.tsv"))
    for name in tables:
        assert (run_dir / "results" / name).read_bytes() == (again_dir / "results" / name).read_bytes(), name
    if template == "variant-review":
        planted, carriers = _planted_carriers(procs.platform)
        with open(run_dir / "results" / "candidates.tsv") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert {r["variant_id"] for r in rows} == planted
        assert {(r["sample"], r["variant_id"]) for r in rows} == carriers
    assert ngp(["audit", "verify"]) == 0


@needs_root
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it)")
def test_a_reviewer_runs_and_reads_a_report_from_the_hub_page(platform_up, alice_workspace):
    """Headless Chromium: lars (clara was removed from cardio-gwas earlier) runs variant-review from the reports
    page and reads it; a screenshot is kept."""
    from playwright.sync_api import sync_playwright

    procs, catalog = platform_up
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            _sign_in(page, f"{procs.url}/services/reports/", "lars")
            page.wait_for_url("**/services/reports/**")
            assert "cardio-gwas" in page.inner_text("body")
            form = page.locator("#form-variant-review")
            form.locator("input[name='p.max_af']").fill("0.95")
            form.locator("button[type=submit]").click()
            page.wait_for_selector("#ngp-done, #ngp-error", timeout=600_000)
            assert page.locator("#ngp-error").count() == 0, page.inner_text("body")
            page.click("#ngp-read")
            page.wait_for_selector("#ngp-provenance")
            assert "lars" in page.inner_text("#ngp-provenance")
            page.screenshot(path=str(OUTPUT / "report-variant-review.png"), full_page=True)
        finally:
            browser.close()
    assert (OUTPUT / "report-variant-review.png").stat().st_size > 10_000
    (record,) = [r for r in catalog.audit.records(action="report.run") if r.actor == "lars"]
    assert record.detail["template"] == "variant-review" and record.detail["status"] == "ok"


REVIEW_CELL = """
import pandas as pd
from ngp_research.widgets import VariantReview
candidates = pd.DataFrame([{"sample": "SYD-0001", "region": "syd", "dataset": "syd-cohort", "contig": "chr1",
    "position": 100, "variant_id": "chr1_100_A_G", "ref": "A", "alt": "G", "gene": "NGPD1",
    "consequence": "missense_variant", "clinical_significance": "Pathogenic", "genotype": "het", "alt_dosage": 1,
    "af": 0.1, "af_region": 0.1}])
review = VariantReview(candidates)
record = review.mark_reviewed("SYD-0001", "chr1_100_A_G", "benign in family history")
print(record["status"], review.store)
"""


@needs_root
def test_a_review_mark_is_stored_in_the_project_and_recorded_by_the_audit_service(alice_workspace, platform_up):
    from .hubclient import run_code

    procs, catalog = platform_up
    before = catalog.audit.records()[-1].seq
    out = asyncio.run(run_code(procs.url + alice_workspace["server"]["url"], alice_workspace["token"], REVIEW_CELL))
    assert out.strip().splitlines()[-1] == "reviewed /project/reviews/variant-review.jsonl"
    stored = procs.platform.projects_dir / "cardio-gwas" / "shared" / "reviews" / "variant-review.jsonl"
    assert "benign in family history" in stored.read_text()
    (mark,) = [r for r in catalog.audit.records() if r.seq > before and r.action == "review.mark"]
    assert (mark.actor, mark.project, mark.path) == ("alice", "cardio-gwas", "/project/reviews/variant-review.jsonl")
    assert mark.detail["variant_id"] == "chr1_100_A_G" and mark.detail["comment"] == "benign in family history"


def _service_pid(procs):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if b"ngp_research.audit.service" in cmd and str(procs.platform.home_path).encode() in env:
            return int(pid)
    raise AssertionError("the audit service is not running")


@needs_root
def test_with_the_audit_service_down_cells_are_refused_and_resume_when_it_returns(alice_workspace, platform_up):
    import signal as _signal

    from .hubclient import run_code

    procs, catalog = platform_up
    url, token = procs.url + alice_workspace["server"]["url"], alice_workspace["token"]
    pid = _service_pid(procs)
    os.kill(pid, _signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match="audit service cannot be reached; no code was run"):
            asyncio.run(run_code(url, token, "open('/project/ran-while-audit-down', 'w').write('x')", timeout=90))
    finally:
        os.kill(pid, _signal.SIGCONT)
    assert not (procs.platform.projects_dir / "cardio-gwas" / "shared" / "ran-while-audit-down").exists()
    assert asyncio.run(run_code(url, token, "print('back')")).strip() == "back"
    assert catalog.audit.verify().ok


@needs_root
def test_a_revoked_tag_stops_the_running_workspace_and_the_restart_no_longer_shows_it(alice_workspace,
                                                                                         platform_up):
    import time

    from .hubclient import run_code

    procs, catalog = platform_up
    browser, token = alice_workspace["browser"], alice_workspace["token"]
    catalog.revoke_tag("syd-cohort", "cardio-gwas", "admin-syd", reason="e2e test")
    deadline = time.time() + 60
    while time.time() < deadline:
        _, model = hub_api(browser, procs.url, "/users/alice", token=token)
        if "cardio-gwas" not in model.get("servers", {}):
            break
        time.sleep(1)
    else:
        raise AssertionError("the workspace was not stopped after the revocation:\n" + procs.log_tail())
    stops = catalog.audit.records(action="workspace.stop", actor="alice")
    assert stops and "syd-cohort (syd): tag revoked" in str(stops[-1].detail)
    server = _start(procs, browser, token, "alice", "cardio-gwas")
    out = asyncio.run(run_code(procs.url + server["url"], token, "import os; print(sorted(os.listdir('/data')))"))
    assert out.strip() == "['norr', 'stockholm', 'uppsala']"


def test_a_workspace_environment_without_the_audit_pth_is_not_started(tmp_path, monkeypatch):
    """An environment built before every program got the audit hook (or half built) would run
    ``!python x.py`` unhooked: the spawner refuses it with a clear reason, and records the refusal."""
    from types import SimpleNamespace

    from tornado import web

    from ngp_research.hub import spawner, state
    from ngp_research.kernel.autostart import PTH_NAME
    from ngp_research.workspace.environment import STAMP, is_built

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / STAMP).write_text("{}\n")
    site = env / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    assert not is_built(str(env))
    (site / PTH_NAME).write_text("import sys\n")
    assert is_built(str(env))
    (site / PTH_NAME).unlink()

    catalog = Catalog.open(Platform(home=str(tmp_path / "ngp")))  # the hub's own catalog and audit store
    monkeypatch.setattr(state, "catalog", lambda: catalog)
    ws = spawner.WorkspaceSpawner(user=SimpleNamespace(name="alice", url="/user/alice/"),
                                  orm_spawner=SimpleNamespace(name="cardio-gwas", server=None), workspace_env=str(env))
    try:
        with pytest.raises(web.HTTPError) as e:
            asyncio.run(ws.start())
        assert e.value.status_code == 503 and "make workspace-env" in e.value.log_message
        assert [(r.action, r.actor, r.project) for r in catalog.audit.records(action="workspace.refused")] == [
            ("workspace.refused", "alice", "cardio-gwas")]
    finally:
        catalog.close()

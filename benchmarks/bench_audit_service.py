"""Audit service throughput with durability on: records per second acknowledged over HTTP.

Side by side in one run: the same records appended straight into the store in
one process (no HTTP, one transaction per record and per 100 records), so
the ratio is what the service's HTTP and group commit cost or save.

    python benchmarks/bench_audit_service.py [--clients 50] [--requests 40]
"""

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from results import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ngp_research.audit import AuditRecord, AuditStore  # noqa: E402
from ngp_research.audit.service import Caller  # noqa: E402
from ngp_research.platform import Platform  # noqa: E402
from tests.test_audit_service import free_port, post, start_service  # noqa: E402


async def auth(token):
    return Caller("alice", "cardio-gwas")


@contextmanager
def running_service(home):
    """The audit service in its own process, as the hub runs it, on a durable store in ``home``; yields its URL."""
    port = free_port()
    proc = start_service(port, home)
    try:
        yield f"http://127.0.0.1:{port}/services/audit/"
    finally:
        proc.kill()
        proc.wait()


def _one_kernel(bodies: list, per_request: int) -> float:
    """Median seconds (of 5) to deliver ``bodies`` one request after another, as one kernel's sender does,
    to a fresh service; each request must be acknowledged for ``per_request`` accesses."""
    with tempfile.TemporaryDirectory() as d:
        Platform(home=d).ensure_layout()
        with running_service(d) as url:
            post(url, bodies[0])  # warm-up
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for body in bodies:
                    status, ack = post(url, body, token="tok-alice")
                    assert status == 200 and ack["acknowledged"] == per_request
                times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=40, help="requests per client")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = {"clients": args.clients, "requests_per_client": args.requests}
    for per_request in (1, 20):
        with tempfile.TemporaryDirectory() as d:
            Platform(home=d).ensure_layout()
            recs = [{"action": "file.open", "path": f"/data/syd/syd-cohort/f{i}", "detail": {"msg_id": "m"}}
                    for i in range(per_request)]
            with running_service(d) as url:
                def client(_):
                    for _ in range(args.requests):
                        status, _ = post(url, recs, token="tok-alice")
                        assert status == 200

                t = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(client, range(args.clients)))
                elapsed = time.perf_counter() - t
            store = AuditStore(f"sqlite:///{d}/state/audit.sqlite", Path(d) / "state" / "keys")
            total = args.clients * args.requests * per_request
            result[f"service_records_per_s_{per_request}_per_request"] = total / elapsed
            assert store.verify().ok
            store.engine.dispose()
            # the same number of records, appended directly, one transaction per request's worth
            store = AuditStore(f"sqlite:///{d}/b.sqlite", Path(d) / "keys2", checkpoint_interval=1000)
            batch = [AuditRecord("file.open", "alice", project="cardio-gwas", region="syd", dataset="syd-cohort",
                                 path=r["path"], detail=r["detail"]) for r in recs]
            n = min(args.clients * args.requests, 400)
            t = time.perf_counter()
            for _ in range(n):
                store.append_many(batch)
            direct = n * per_request / (time.perf_counter() - t)
            result[f"direct_records_per_s_{per_request}_per_transaction"] = direct
            result[f"ratio_service_over_direct_{per_request}"] = (
                result[f"service_records_per_s_{per_request}_per_request"] / direct)
            store.engine.dispose()
    # One kernel delivering a cell's 10,000 opens: runs of opens travel as one record with "paths"
    # (2,000 per request, as the kernel's sender sends them), one request after another.
    detail = {"event": "open", "mode": "r", "flags": 524288, "msg_id": "m" * 36, "cell_id": None}
    grouped = [[{"action": "file.open", "paths": [f"/project/files/f{i:05d}.txt" for i in range(j, j + 2000)],
                 "detail": detail}] for j in range(0, 10_000, 2000)]
    result["one_kernel_10000_opens_s"] = _one_kernel(grouped, 2000)
    result["one_kernel_records_per_s"] = 10_000 / result["one_kernel_10000_opens_s"]
    # One kernel delivering a pysam loop's 2,000 fetches (data.open records, 500 per request): on one
    # file they are stored as one record per request listing the regions; alternating between two files
    # (no run forms), as one record per fetch, which is what every fetch cost before.
    for name, paths in (("one_file", ["/data/syd/syd-cohort/syd-cohort.vcf.gz"]),
                        ("two_files", ["/data/syd/syd-cohort/syd-cohort.vcf.gz", "/data/syd/syd-cohort/other.vcf.gz"])):
        fetches = [{"action": "data.open", "path": paths[i % len(paths)], "detail": {
            "contig": "chr1", "start": s, "stop": s + 200, "library": "pysam", "entry_point": "VariantFile.fetch",
            "msg_id": "m" * 36, "cell_id": None}} for i, s in enumerate(range(1, 1_000_000, 500))]
        bodies = [fetches[j:j + 500] for j in range(0, len(fetches), 500)]
        result[f"one_kernel_2000_fetches_{name}_s"] = _one_kernel(bodies, 500)
    print(f"audit service, {args.clients} concurrent clients x {args.requests} requests, durable (synchronous=FULL):")
    for k in (1, 20):
        print(f"  {k:>2} record(s)/request: {result[f'service_records_per_s_{k}_per_request']:>9,.0f} rec/s acknowledged;"
              f" direct append {result[f'direct_records_per_s_{k}_per_transaction']:>9,.0f} rec/s;"
              f" ratio {result[f'ratio_service_over_direct_{k}']:.2f}x")
    print(f"  one kernel, a cell's 10,000 opens as 5 requests of 2,000 paths: {result['one_kernel_10000_opens_s'] * 1e3:.0f} ms"
          f" ({result['one_kernel_records_per_s']:,.0f} rec/s)")
    one, two = result["one_kernel_2000_fetches_one_file_s"], result["one_kernel_2000_fetches_two_files_s"]
    print(f"  one kernel, 2,000 fetches as 4 requests of 500: on one file {one * 1e3:.0f} ms ({2000 / one:,.0f} rec/s);"
          f" alternating between two files (a record each) {two * 1e3:.0f} ms; ratio {one / two:.2f}x")
    return save(args.out, result)


if __name__ == "__main__":
    main()

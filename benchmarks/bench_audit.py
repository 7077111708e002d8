"""Audit chain throughput: append and verify, in records per second, beside plain SQLite.

The peer is the same rows written to (and read from) an ordinary SQLite table
with no hashing, no chain and no signatures, in the same run, so the ratio is
the price of tamper evidence.

    python benchmarks/bench_audit.py [--records N]
"""

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from results import save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ngp_research.audit import AuditRecord, AuditStore  # noqa: E402


def records(n, start=0):
    return [
        AuditRecord("file.open", f"user{i % 50}", project="cardio-gwas", region="syd", dataset="syd-cohort",
                    path=f"/data/syd/syd-cohort/chunk{i}.vcf.gz", detail={"cell": i % 1000, "mode": "rb"})
        for i in range(start, start + n)
    ]


def plain_sqlite(path, rows, batch, single):
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("create table r (seq integer primary key, time text, action text, actor text, project text, "
                "region text, dataset text, path text, detail text)")
    tuples = [(i + 1, "2026-01-01T00:00:00.000000Z", r.action, r.actor, r.project, r.region, r.dataset, r.path,
               json.dumps(r.detail)) for i, r in enumerate(rows)]
    t = time.perf_counter()
    for s in range(0, len(tuples), batch):
        con.execute("begin immediate")
        con.executemany("insert into r values (?,?,?,?,?,?,?,?,?)", tuples[s:s + batch])
        con.execute("commit")
    append = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(single):
        con.execute("begin immediate")
        con.execute("insert into r values (?,?,?,?,?,?,?,?,?)", (len(tuples) + i + 1,) + tuples[i][1:])
        con.execute("commit")
    one = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(1 for _ in con.execute("select * from r order by seq"))
    scan = time.perf_counter() - t
    con.close()
    return append, one, scan, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per group commit")
    ap.add_argument("--single", type=int, default=500, help="records appended one commit each")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    rows = records(args.records)
    with tempfile.TemporaryDirectory() as d:
        store = AuditStore(f"sqlite:///{d}/audit.sqlite", Path(d) / "keys", checkpoint_interval=10_000)
        t = time.perf_counter()
        for s in range(0, len(rows), args.batch):
            store.append_many(rows[s:s + args.batch])
        append = time.perf_counter() - t
        t = time.perf_counter()
        for r in records(args.single):
            store.append(r)
        one = time.perf_counter() - t
        store.checkpoint()
        t = time.perf_counter()
        report = store.verify()
        verify = time.perf_counter() - t
        assert report.ok, report.problems
        store.engine.dispose()
        p_append, p_one, p_scan, _ = plain_sqlite(f"{d}/plain.sqlite", rows, args.batch, args.single)

    total = args.records + args.single
    result = {
        "records": args.records,
        "batch": args.batch,
        "chain_append_per_s": args.records / append,
        "plain_append_per_s": args.records / p_append,
        "chain_single_append_per_s": args.single / one,
        "plain_single_append_per_s": args.single / p_one,
        "chain_verify_per_s": total / verify,
        "plain_scan_per_s": total / p_scan,
    }
    result["append_ratio_plain_over_chain"] = result["plain_append_per_s"] / result["chain_append_per_s"]
    result["single_append_ratio_plain_over_chain"] = result["plain_single_append_per_s"] / result["chain_single_append_per_s"]
    result["verify_ratio_scan_over_verify"] = result["plain_scan_per_s"] / result["chain_verify_per_s"]
    print(f"audit chain, {args.records} records in group commits of {args.batch}, "
          f"then {args.single} single-record commits (SQLite, synchronous=FULL):")
    print(f"  append (grouped): {result['chain_append_per_s']:>10,.0f} rec/s   plain SQLite "
          f"{result['plain_append_per_s']:>10,.0f} rec/s   ratio {result['append_ratio_plain_over_chain']:.2f}x")
    print(f"  append (single):  {result['chain_single_append_per_s']:>10,.0f} rec/s   plain SQLite "
          f"{result['plain_single_append_per_s']:>10,.0f} rec/s   ratio {result['single_append_ratio_plain_over_chain']:.2f}x")
    print(f"  verify:           {result['chain_verify_per_s']:>10,.0f} rec/s   plain scan   "
          f"{result['plain_scan_per_s']:>10,.0f} rec/s   ratio {result['verify_ratio_scan_over_verify']:.2f}x")
    return save(args.out, result)


if __name__ == "__main__":
    main()

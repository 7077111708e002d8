"""`make bench`: every benchmark, results written to benchmarks/results/ (not committed)."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_audit  # noqa: E402
import bench_audit_service  # noqa: E402
import bench_ingest  # noqa: E402
import bench_kernel  # noqa: E402
import bench_spawn  # noqa: E402

results = HERE / "results"
bench_audit.main(["--out", str(results / "audit.json")])
print()
bench_audit_service.main(["--out", str(results / "audit_service.json")])
print()
bench_ingest.main(["--out", str(results / "ingest.json")])
print()
bench_kernel.main(["--out", str(results / "kernel.json")])
print()
if os.geteuid() == 0:
    bench_spawn.main(["--out", str(results / "spawn.json")])
else:
    print("bench_spawn skipped: it needs root (the sandbox drops to each member's uid)")

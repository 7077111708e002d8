"""`make bench`: every benchmark, results written to benchmarks/results/ (not committed)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_audit  # noqa: E402
import bench_ingest  # noqa: E402

results = HERE / "results"
bench_audit.main(["--out", str(results / "audit.json")])
print()
bench_ingest.main(["--out", str(results / "ingest.json")])

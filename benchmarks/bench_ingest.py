"""Validated ingest of one simulated cohort VCF, beside what an admin would do by hand with bcftools.

Ours: ``ingest_dataset`` (copy + sha256 + BGZF walk + full record parse +
index check + metadata validation + one catalog transaction).
Peer, in the same run: copy + sha256 + ``bcftools view`` decoding every
record + ``bcftools index --tbi`` (htslib's bcftools, as shipped in pysam).

    python benchmarks/bench_ingest.py [--samples N] [--variants M]
"""

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from results import save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysam import bcftools  # noqa: E402

from ngp_research.catalog import Catalog  # noqa: E402
from ngp_research.demo.simulate import simulate_cohorts  # noqa: E402
from ngp_research.ingest import ingest_dataset  # noqa: E402
from ngp_research.platform import Platform  # noqa: E402


def peer(vcf: Path, dest: Path) -> float:
    t = time.perf_counter()
    dest.mkdir()
    copy = dest / vcf.name
    shutil.copyfile(vcf, copy)
    h = hashlib.sha256()
    with open(copy, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    bcftools.view("-Ou", "-o", "/dev/null", str(copy), catch_stdout=False)
    bcftools.index("--tbi", "-f", str(copy))
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500, help="samples in the cohort")
    ap.add_argument("--variants", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cohorts, _ = simulate_cohorts(d / "inbox", regions=("syd", "norr"), samples_per_region=args.samples,
                                      variants=args.variants, seed=7)
        c = cohorts[0]
        size_mb = c.vcf.stat().st_size / 1e6
        ours, theirs = [], []
        for i in range(args.repeat):
            platform = Platform(home=str(d / f"home{i}"))
            catalog = Catalog.open(platform)
            catalog.ensure_regions()
            catalog.add_user("admin-syd", "syd", ["region-admin"])
            t = time.perf_counter()
            ingest_dataset(catalog, "syd", "syd-cohort", [c.vcf], "admin-syd", metadata=c.metadata)
            ours.append(time.perf_counter() - t)
            catalog.close()
            theirs.append(peer(c.vcf, d / f"peer{i}"))
    result = {
        "samples": args.samples,
        "variants": args.variants,
        "vcf_mb": size_mb,
        "ngp_ingest_s": min(ours),
        "bcftools_view_index_s": min(theirs),
    }
    result["ratio_ngp_over_bcftools"] = result["ngp_ingest_s"] / result["bcftools_view_index_s"]
    print(f"ingest of one VCF ({args.samples} samples x {args.variants} variants, {size_mb:.1f} MB), best of "
          f"{args.repeat}:")
    print(f"  ngp dataset ingest:                 {result['ngp_ingest_s']:7.2f} s")
    print(f"  copy+sha256+bcftools view+index:    {result['bcftools_view_index_s']:7.2f} s")
    print(f"  ratio (ngp / bcftools):             {result['ratio_ngp_over_bcftools']:7.2f}x")
    return save(args.out, result)


if __name__ == "__main__":
    main()

"""Cohort analysis (issue 5): the Cohort API beside plain Hail, PLINK 2 and bcftools, in one run.

One msprime cohort (default 5 regions x 1,000 samples x 100,000 variants, generated with
``ngp_research.demo.simulate`` into ``--workdir``, outside the repository, and reused by later runs
of the same size) is analysed by four engines, each in its own child process
(``python benchmarks/cohort.py --engine NAME ...``), one after the other:

ours      ``Cohort`` with 2 Dask workers (one Hail context each, ``hail_memory`` 3g):
          conversion = ``prepare()`` on an empty cache (VCF -> MatrixTable per dataset, then
          the genome shards' 2-bit blocks); compute = the analyses after it.
hail      plain Hail on Spark ``local[2]``, one ``hl.init`` (driver memory 6g): conversion =
          ``hl.import_vcf(min_partitions=8)`` of the merged VCF + ``write`` (by default Hail
          makes one partition of this file and uses one core); compute = each step read from the
          MatrixTable, its result written as a Hail Table (``hl.variant_qc``, ``hl.sample_qc``,
          ``hl.agg.hardy_weinberg_test``, ``hl.agg.group_by`` of ``hl.agg.call_stats``,
          ``hl.linear_regression_rows``, ``hl.logistic_regression_rows('wald')``,
          ``hl.hwe_normalized_pca(k=10)`` on MAF >= 0.01).
plink2    ``--vcf --make-pgen`` (conversion), then ``--freq``/``--hardy``/``--missing``/
          ``--sample-counts``/``--loop-cats``/``--glm``/``--pca 10 --maf 0.01``, ``--threads 2``.
bcftools  what it can do straight from the merged VCF: ``+fill-tags`` (AC, AN, AF, HWE, ...,
          per region with ``-S``) piped to ``bcftools query``, and ``bcftools stats -s -``.

The peers read one merged VCF (``bcftools merge`` of the regions' VCFs, timed and reported on its
own); ours reads the regions' VCFs as they are. A thread samples, every 0.1 s, the summed RSS of
the engine's child process and all its descendants (Dask workers, JVMs, plink2, bcftools;
``time -v`` would miss the JVMs); each step's peak is the highest sample between its start and
end. For plink2 and bcftools the small Python process that launches them is left out of the sum,
and their ``wait4`` peak RSS (summed over a pipe) is used too, since they often finish within 0.1 s.

Two totals per engine: compute only (the steps after conversion) and end to end from the VCF
(startup + conversion + compute; the merge is listed separately). Targets (issue 5): ours at
least as fast as plain Hail for compute, and no step more than 10x slower than PLINK 2. Numbers
only; nothing here asserts on timing.

    python benchmarks/cohort.py [--regions 5] [--samples-per-region 1000] [--variants 100000]
        [--workdir /tmp/ngp-bench-cohort] [--quick] [--engines ours,hail,plink2,bcftools]
        [--hail-partitions 8] [--wait-idle SECONDS] [--keep] [--out benchmarks/results/cohort.json]

On a shared machine, ``--wait-idle 900`` waits before each engine until other processes leave the
cores idle; the CPU other processes used while each engine ran is reported either way.
Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from results import save

ENGINES = ("ours", "hail", "plink2", "bcftools")
STEPS = ("variant_qc", "sample_qc", "hardy_weinberg", "allele_frequencies", "linear", "logistic", "pca")
STEP_TITLES = {
    "startup": "startup",
    "conversion": "conversion",
    "variant_qc": "variant QC",
    "sample_qc": "sample QC",
    "hardy_weinberg": "Hardy-Weinberg",
    "allele_frequencies": "allele freq. by region",
    "linear": "linear (cholesterol ~ sex)",
    "logistic": "logistic (HCM ~ sex)",
    "pca": "PCA k=10, MAF>=0.01",
}
THREADS = 2
QUICK = {"regions": 2, "samples_per_region": 50, "variants": 2000}


# --------------------------------------------------------------------------------------------
# child side: one engine's steps, each recorded as a JSON line {step, phase, start, end}
# --------------------------------------------------------------------------------------------


class Recorder:
    """Writes each step's start and end (time.monotonic, shared by all processes) to a JSON-lines file."""

    def __init__(self, path: str):
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the child's lifetime)

    def write(self, **record):
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    @contextmanager
    def step(self, name: str, phase: str = "compute", **detail):
        start = time.monotonic()
        self.write(event="start", step=name, phase=phase, start=start)
        extra: dict = {}
        try:
            yield extra
        except BaseException:
            self.write(event="error", step=name, phase=phase, start=start, end=time.monotonic(),
                       error=traceback.format_exc())
            raise
        self.write(event="end", step=name, phase=phase, start=start, end=time.monotonic(), **detail, **extra)

    def check(self, **values):
        self.write(event="check", **values)


def _run(*commands, stdout=None) -> int:
    """Run commands piped one into the next; return the sum of their peak RSS in KiB (from wait4).

    The sampler misses a tool that runs for less than its 0.1 s interval; ``wait4``'s ``ru_maxrss``
    does not, and a pipeline's processes run at the same time, so their peaks are added.
    """
    procs, upstream = [], None
    for i, cmd in enumerate(commands):
        last = i == len(commands) - 1
        p = subprocess.Popen([str(c) for c in cmd], stdin=upstream,
                             stdout=(stdout or subprocess.DEVNULL) if last else subprocess.PIPE)
        if upstream is not None:
            upstream.close()
        upstream = None if last else p.stdout
        procs.append(p)
    total, failed = 0, []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        total += usage.ru_maxrss
        if p.returncode:
            failed.append(f"{' '.join(p.args)} -> {p.returncode}")
    if failed:
        raise RuntimeError("command failed: " + "; ".join(failed))
    return total


def engine_merge(spec: dict, rec: Recorder) -> None:
    with rec.step("merge", "prep") as extra:
        extra["tool_maxrss_kb"] = _run(["bcftools", "merge", "--threads", THREADS, "-Oz", "-o", spec["merged_vcf"],
                                        *[d["vcf"] for d in spec["datasets"]]])


def _task_summary(stream) -> dict:
    """Dask task stream -> {task prefix: [tasks, summed compute seconds]}."""
    out: dict = {}
    for task in stream.data:
        key = task["key"] if isinstance(task["key"], str) else str(task["key"])
        prefix = key.split("-")[0]
        compute = sum(s["stop"] - s["start"] for s in task.get("startstops", ()) if s["action"] == "compute")
        count, total = out.get(prefix, (0, 0.0))
        out[prefix] = [count + 1, round(total + compute, 3)]
    return out


def engine_ours(spec: dict, rec: Recorder) -> None:
    from distributed import get_task_stream

    from ngp_research.cohort import Cohort, CohortDataset

    datasets = [CohortDataset(d["name"], d["region"], d["vcf"], d["sha256"], d["metadata"])
                for d in spec["datasets"]]
    cache = Path(spec["rundir"]) / "ours-cache"
    options = {"workers": THREADS, "cache_dir": str(cache), "progress": False, "hail_memory": spec["worker_memory"]}

    with rec.step("startup", "startup"):
        cohort = Cohort(datasets, **options)

    @contextmanager
    def step(name, phase="compute"):
        # The task stream is opened and read outside the timed step: what the Dask tasks of the step
        # spent computing on the workers, by function.
        with get_task_stream(client=cohort.client) as stream:  # noqa: SIM117 (the order matters)
            with rec.step(name, phase):
                yield
        rec.write(event="tasks", step=name, tasks=_task_summary(stream))

    with step("conversion", "conversion"):
        cohort.prepare()
    with step("variant_qc"):
        vqc = cohort.variant_qc()
    with step("sample_qc"):
        sqc = cohort.sample_qc()
    with step("hardy_weinberg"):
        hwe = cohort.hardy_weinberg()
    with step("allele_frequencies"):
        af = cohort.allele_frequencies(by="region")
    with step("linear"):
        lin = cohort.association("cholesterol", covariates=["sex"])
    with step("logistic"):
        log = cohort.association("hypertrophic_cardiomyopathy", covariates=["sex"])
    with step("pca"):
        pca = cohort.pca(k=10, min_maf=0.01)
    best = lin.loc[lin.p_value.idxmin()]
    rec.check(variants=len(vqc), samples=len(sqc), mean_af=float(vqc.af.mean()),
              hwe_p_lt_1e6=int((hwe.p_value < 1e-6).sum()), af_columns=[c for c in af.columns if c.startswith("af")],
              linear_min_p=float(lin.p_value.min()), linear_top=str(best.variant_id),
              logistic_min_p=float(log.p_value.min()), logistic_not_converged=int((~log.converged).sum()),
              pca_eigenvalues=[round(float(v), 4) for v in pca.eigenvalues[:3]], pca_variants=int(pca.variants_used),
              mean_n_het=float(sqc.n_het.mean()),
              cache_mb=round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6, 1))
    with rec.step("close", "teardown"):
        cohort.close()
    # The researcher's next session: the same datasets, cache warm (no conversion, no export).
    with rec.step("reopen_warm_cache", "extra"):
        again = Cohort(datasets, **options)
        again.prepare()
        again.variant_qc()
    again.close()


def engine_hail(spec: dict, rec: Recorder) -> None:
    with rec.step("startup", "startup"):
        import hail as hl

        scratch = Path(spec["rundir"]) / "hail-tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        hl.init(master=f"local[{THREADS}]", app_name="bench-cohort", quiet=True, tmp_dir=str(scratch),
                local_tmpdir=str(scratch), log=str(scratch / "hail.log"),
                spark_conf={"spark.driver.memory": spec["hail_memory"], "spark.ui.enabled": "false",
                            "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                            "spark.local.dir": str(scratch)})
        contigs = [c for c, _ in spec["contigs"]]
        rg = hl.ReferenceGenome("bench_cohort", contigs, {c: n for c, n in spec["contigs"]})

    out = Path(spec["rundir"]) / "hail"
    out.mkdir(parents=True, exist_ok=True)
    mt_path = str(out / "cohort.mt")
    with rec.step("conversion", "conversion"):
        # min_partitions: by default Hail makes one partition of this one bgzipped file (< 128 MB) and
        # then uses one core; as many partitions as our shards lets local[2] use both.
        hl.import_vcf(spec["merged_vcf"], reference_genome=rg, force_bgz=True,
                      min_partitions=spec["hail_partitions"]).write(mt_path, overwrite=True)

    def load():
        pheno = hl.import_table(spec["hail_pheno"], key="s",
                                types={"sex": hl.tfloat64, "cholesterol": hl.tfloat64, "hcm": hl.tbool})
        mt = hl.read_matrix_table(mt_path)
        return mt.annotate_cols(ph=pheno[mt.s])

    with rec.step("variant_qc"):
        mt = hl.variant_qc(load())
        mt.rows().select("variant_qc").write(str(out / "variant_qc.ht"), overwrite=True)
    with rec.step("sample_qc"):
        mt = hl.sample_qc(load())
        mt.cols().select("sample_qc").write(str(out / "sample_qc.ht"), overwrite=True)
    with rec.step("hardy_weinberg"):
        mt = load()
        mt = mt.annotate_rows(hwe=hl.agg.hardy_weinberg_test(mt.GT))
        mt.rows().select("hwe").write(str(out / "hwe.ht"), overwrite=True)
    with rec.step("allele_frequencies"):
        mt = load()
        mt = mt.annotate_rows(all=hl.agg.call_stats(mt.GT, mt.alleles),
                              by_region=hl.agg.group_by(mt.ph.region, hl.agg.call_stats(mt.GT, mt.alleles)))
        mt.rows().select("all", "by_region").write(str(out / "af.ht"), overwrite=True)
    with rec.step("linear"):
        mt = load()
        hl.linear_regression_rows(y=mt.ph.cholesterol, x=mt.GT.n_alt_alleles(), covariates=[1.0, mt.ph.sex]
                                  ).write(str(out / "linear.ht"), overwrite=True)
    with rec.step("logistic"):
        mt = load()
        hl.logistic_regression_rows("wald", y=hl.float64(mt.ph.hcm), x=mt.GT.n_alt_alleles(),
                                    covariates=[1.0, mt.ph.sex]).write(str(out / "logistic.ht"), overwrite=True)
    with rec.step("pca"):
        mt = hl.variant_qc(load())
        mt = mt.filter_rows(hl.min(mt.variant_qc.AF) >= 0.01)
        eigenvalues, scores, _ = hl.hwe_normalized_pca(mt.GT, k=10)
        scores.write(str(out / "pca_scores.ht"), overwrite=True)

    vqc = hl.read_table(str(out / "variant_qc.ht"))
    lin = hl.read_table(str(out / "linear.ht"))
    log = hl.read_table(str(out / "logistic.ht"))
    hwe = hl.read_table(str(out / "hwe.ht"))
    top = lin.order_by(lin.p_value).head(1).collect()[0]
    rec.check(variants=vqc.count(), mean_af=vqc.aggregate(hl.agg.mean(vqc.variant_qc.AF[1])),
              hwe_p_lt_1e6=hwe.aggregate(hl.agg.count_where(hwe.hwe.p_value < 1e-6)),
              linear_min_p=float(top.p_value), linear_top=f"{top.locus.contig}_{top.locus.position}",
              logistic_min_p=log.aggregate(hl.agg.min(log.p_value)),
              logistic_not_converged=log.aggregate(hl.agg.count_where(~log.fit.converged)),
              pca_eigenvalues=[round(float(v), 4) for v in eigenvalues[:3]])
    hl.stop()


def _plink(*args) -> int:
    return _run(["plink2", "--threads", THREADS, *args])


def engine_plink2(spec: dict, rec: Recorder) -> None:
    out = Path(spec["rundir"]) / "plink2"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    pheno = ["--pheno", spec["plink_pheno"]]
    covar = ["--covar", spec["plink_covar"], "--covar-name", "sex"]
    steps = {
        "conversion": [["--vcf", spec["merged_vcf"], "--make-pgen", "--out", data]],
        "variant_qc": [["--pfile", data, "--freq", "--hardy", "--missing", "variant-only", "--out", out / "vqc"]],
        "sample_qc": [["--pfile", data, "--sample-counts", "--missing", "sample-only", "--out", out / "sqc"]],
        "hardy_weinberg": [["--pfile", data, "--hardy", "--out", out / "hwe"]],
        "allele_frequencies": [["--pfile", data, "--freq", "--out", out / "af"],
                               ["--pfile", data, "--pheno", spec["plink_regions"], "--loop-cats", "region", "--freq",
                                "--out", out / "af"]],
        "linear": [["--pfile", data, *pheno, "--pheno-name", "cholesterol", *covar, "--glm", "hide-covar",
                    "--out", out / "lin"]],
        "logistic": [["--pfile", data, *pheno, "--pheno-name", "hcm", *covar, "--glm", "hide-covar", "no-firth",
                      "--out", out / "log"]],
        "pca": [["--pfile", data, "--maf", "0.01", "--pca", "10", "--out", out / "pca"]],
    }
    for name, commands in steps.items():
        with rec.step(name, "conversion" if name == "conversion" else "compute") as extra:
            extra["tool_maxrss_kb"] = max(_plink(*c) for c in commands)

    def table(path):
        with open(path, encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))

    def pvalues(rows):
        return [(float(r["P"]), r["ID"]) for r in rows if r["P"] not in ("NA", "")]

    lin = pvalues(table(out / "lin.cholesterol.glm.linear"))
    log = table(out / "log.hcm.glm.logistic")
    hwe = table(out / "hwe.hardy")
    freq = table(out / "af.afreq")
    rec.check(variants=len(freq), mean_af=sum(float(r["ALT_FREQS"]) for r in freq) / max(len(freq), 1),
              hwe_p_lt_1e6=sum(float(r["P"]) < 1e-6 for r in hwe),
              linear_min_p=min(lin)[0], linear_top=min(lin)[1],
              logistic_min_p=min(pvalues(log))[0], logistic_na=sum(r["P"] == "NA" for r in log),
              pca_eigenvalues=[round(float(v), 4) for v in (out / "pca.eigenval").read_text().split()[:3]],
              region_files=sorted(p.name for p in out.glob("af.*.afreq")))


def engine_bcftools(spec: dict, rec: Recorder) -> None:
    out = Path(spec["rundir"]) / "bcftools"
    out.mkdir(parents=True, exist_ok=True)
    vcf = spec["merged_vcf"]
    query = ["bcftools", "query", "-f", "%CHROM\t%POS\t%ID\t%REF\t%ALT\t%INFO\n"]

    def fill_tags(*options, to):
        return _run(["bcftools", "+fill-tags", vcf, "-Ou", "--", *options], [*query, "-o", out / to])

    with rec.step("variant_qc") as extra:
        extra["tool_maxrss_kb"] = fill_tags("-t", "AC,AN,AF,NS,F_MISSING,AC_Het,AC_Hom,HWE", to="vqc.tsv")
    with rec.step("sample_qc") as extra, open(out / "stats.txt", "w") as handle:
        extra["tool_maxrss_kb"] = _run(["bcftools", "stats", "-s", "-", vcf], stdout=handle)
    with rec.step("hardy_weinberg") as extra:
        extra["tool_maxrss_kb"] = fill_tags("-t", "HWE", to="hwe.tsv")
    with rec.step("allele_frequencies") as extra:
        extra["tool_maxrss_kb"] = fill_tags("-S", spec["populations"], "-t", "AF,AC,AN", to="af.tsv")
    with open(out / "af.tsv") as handle:
        rows = sum(1 for _ in handle)
    with open(out / "stats.txt") as handle:
        psc = sum(1 for line in handle if line.startswith("PSC"))
    rec.check(variants=rows, samples_in_stats=psc)


def child_main(name: str, spec_path: str, events: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rec = Recorder(events)
    function = {"merge": engine_merge, "ours": engine_ours, "hail": engine_hail, "plink2": engine_plink2,
                "bcftools": engine_bcftools}[name]
    try:
        function(spec, rec)
    except Exception:  # noqa: BLE001 (the error is in the events file and the log; the parent reports it)
        traceback.print_exc()
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# parent side: data, inputs, one sampled child per engine, the tables
# --------------------------------------------------------------------------------------------


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores) since boot."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every ``interval`` seconds.

    Each sample also has the machine's busy CPU seconds and the CPU seconds of the tree's processes
    (seen so far, exited ones included), so that what *other* processes used meanwhile is known: a
    benchmark on a shared machine says when something else competed for the cores.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        # (monotonic time, tree RSS, root RSS, machine busy CPU s, tree CPU s)
        self.samples: list[tuple[float, int, int, float, float]] = []
        self.processes = 0
        self._cpu: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            t = time.monotonic()
            busy = machine_busy()
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total = root_rss = 0
            for p in procs:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        cpu = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                self._cpu[p.pid] = cpu.user + cpu.system
                if p.pid == self.pid:
                    root_rss = rss
            self.processes = max(self.processes, len(procs))
            self.samples.append((t, total, root_rss, busy, sum(self._cpu.values())))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()

    def cpu(self, start: float, end: float) -> dict | None:
        """CPU seconds of the tree and of everything else on the machine between two times."""
        window = [s for s in self.samples if start <= s[0] <= end]
        if len(window) < 2 or window[-1][0] - window[0][0] < 0.5:
            return None
        (t0, _, _, busy0, tree0), (t1, _, _, busy1, tree1) = window[0], window[-1]
        other = max(0.0, (busy1 - busy0) - (tree1 - tree0))
        return {"engine_cpu_s": round(tree1 - tree0, 1), "other_cpu_s": round(other, 1),
                "other_cores": round(other / (t1 - t0), 2)}

    def peak(self, start: float, end: float, without_root: bool = False) -> int:
        window = [s for s in self.samples if start <= s[0] <= end]
        if not window:  # a step shorter than the interval: the nearest sample after its start
            later = [s for s in self.samples if s[0] >= start]
            window = later[:1] or self.samples[-1:]
        if not window:
            return 0
        return max(s[1] - s[2] if without_root else s[1] for s in window)


def wait_idle(max_wait: float, log, threshold: float = 0.25) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` cores over 10 s."""
    if max_wait <= 0:
        return None
    started = time.monotonic()
    while True:
        before = machine_busy()
        time.sleep(10)
        cores = (machine_busy() - before) / 10
        if cores < threshold or time.monotonic() - started > max_wait:
            waited = time.monotonic() - started
            if waited > 15:
                print(f"  (waited {waited:.0f} s for the machine to be idle; now {cores:.2f} cores busy)",
                      file=log, flush=True)
            return round(waited, 1)


def run_engine(name: str, spec_path: Path, rundir: Path, timeout: float, log) -> dict:
    """Run one engine's child under the sampler; return its steps with wall time and peak RSS."""
    events = rundir / f"events-{name}.jsonl"
    env = dict(os.environ, TMPDIR=str(rundir / "tmp"), PYTHONUNBUFFERED="1")
    (rundir / "tmp").mkdir(exist_ok=True)
    started = time.monotonic()
    with open(rundir / f"{name}.log", "w") as output:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--engine", name,
                                  "--spec", str(spec_path), "--events", str(events)],
                                 stdout=output, stderr=subprocess.STDOUT, env=env, cwd=str(rundir),
                                 start_new_session=True)
        sampler = TreeSampler(child.pid)
        sampler.start()
        timed_out = False
        try:
            rc = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(child.pid, signal.SIGKILL)
            rc = child.wait()
        sampler.stop()
    wall = time.monotonic() - started
    leftovers = _leftovers(child.pid)
    records = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    without_root = name in ("plink2", "bcftools", "merge")
    steps, checks, failed = {}, {}, None
    for r in records:
        if r["event"] == "end":
            sampled = sampler.peak(r["start"], r["end"], without_root) / 2**20
            tool = r.get("tool_maxrss_kb", 0) / 1024
            steps[r["step"]] = {"phase": r["phase"], "wall_s": round(r["end"] - r["start"], 3),
                                "peak_rss_mb": round(max(sampled, tool), 1), "sampled_peak_rss_mb": round(sampled, 1)}
            if tool:
                steps[r["step"]]["tool_maxrss_mb"] = round(tool, 1)
            cpu = sampler.cpu(r["start"], r["end"])
            if cpu:
                steps[r["step"]].update(cpu)
        elif r["event"] == "tasks" and r["step"] in steps:
            steps[r["step"]]["dask_tasks"] = r["tasks"]
        elif r["event"] == "error":
            failed = {"step": r["step"], "after_s": round(r["end"] - r["start"], 1),
                      "error": r["error"].strip().splitlines()[-1]}
        elif r["event"] == "check":
            checks = {k: v for k, v in r.items() if k != "event"}
    started_steps = [r["step"] for r in records if r["event"] == "start"]
    if failed is None and (rc != 0 or timed_out):
        unfinished = [s for s in started_steps if s not in steps]
        failed = {"step": unfinished[-1] if unfinished else None,
                  "error": "timed out" if timed_out else f"exit status {rc} (see {rundir / (name + '.log')})"}
    peak_all = max((s[1] - s[2] if without_root else s[1]) for s in sampler.samples) if sampler.samples else 0
    peak_all = max([peak_all] + [s["peak_rss_mb"] * 2**20 for s in steps.values()])
    result = {"steps": steps, "checks": checks, "exit_status": rc, "child_wall_s": round(wall, 1),
              "peak_rss_mb": round(peak_all / 2**20, 1), "max_processes": sampler.processes,
              "leftover_processes": leftovers,
              **(sampler.cpu(started, time.monotonic()) or {})}
    if failed:
        result["failed"] = failed
        try:
            result["log_tail"] = (rundir / f"{name}.log").read_text()[-3000:]
        except OSError:
            pass
    other = result.get("other_cores")
    print(f"  {name}: exit {rc} in {wall:.1f} s, peak {peak_all / 2**30:.2f} GiB"
          + (f"; other processes on the machine used {other:.2f} cores meanwhile" if other is not None else "")
          + (f", FAILED at {failed['step']}: {failed['error']}" if failed else ""), file=log, flush=True)
    return result


def _leftovers(pgid: int) -> int:
    """Processes of the engine's session still alive after its child exited (killed, and counted)."""
    import psutil

    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                alive.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    if alive:
        time.sleep(5)
        still = []
        for p in alive:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        alive = still
    return len(alive)


def region_names(value: str) -> list[str]:
    from ngp_research.demo.simulate import DEFAULT_REGIONS

    if value.isdigit():
        n = int(value)
        if not 1 <= n:
            raise SystemExit("--regions: at least 1")
        return list(DEFAULT_REGIONS[:n]) + [f"region{i}" for i in range(len(DEFAULT_REGIONS) + 1, n + 1)]
    return [r for r in value.split(",") if r]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ensure_data(workdir: Path, regions: list[str], samples: int, variants: int, seed: int) -> dict:
    """The simulated cohort of this size, generated once into the work folder and reused."""
    from ngp_research.demo.simulate import simulate_cohorts

    folder = workdir / f"data-r{len(regions)}-n{samples}-v{variants}-s{seed}"
    marker = folder / "bench-data.json"
    if marker.exists():
        data = json.loads(marker.read_text())
        if data.get("regions") == regions:
            return data
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    cohorts, _ = simulate_cohorts(folder, regions=tuple(regions), samples_per_region=samples, variants=variants,
                                  seed=seed)
    data = {"regions": regions, "simulate_s": round(time.perf_counter() - t, 1), "datasets": [
        {"name": f"{c.region}-cohort", "region": c.region, "vcf": str(c.vcf), "sha256": sha256(c.vcf),
         "metadata": str(c.metadata), "samples": list(c.samples)} for c in cohorts]}
    marker.write_text(json.dumps(data))
    return data


def write_inputs(data: dict, rundir: Path) -> dict:
    """The peers' side files: phenotypes, covariates and populations, from the same phenopackets."""
    from ngp_research.cohort.inputs import phenotype_table

    rows = []
    for d in data["datasets"]:
        table = phenotype_table(json.loads(Path(d["metadata"]).read_text()), d["region"], d["name"])
        by_sample = table.set_index("sample")
        for s in d["samples"]:
            r = by_sample.loc[s]
            rows.append((s, d["region"], 1.0 if r.sex == "MALE" else 0.0, float(r.cholesterol),
                         bool(r.hypertrophic_cardiomyopathy)))
    inputs = rundir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    # name -> (file, header or None, one line's fields from (sample, region, sex, cholesterol, hcm))
    tables = {
        "hail_pheno": ("hail-pheno.tsv", "s\tregion\tsex\tcholesterol\thcm",
                       lambda s, reg, sex, chol, hcm: (s, reg, sex, chol, str(hcm).lower())),
        "plink_pheno": ("plink-pheno.tsv", "#IID\tcholesterol\thcm",
                        lambda s, reg, sex, chol, hcm: (s, chol, 2 if hcm else 1)),
        "plink_covar": ("plink-covar.tsv", "#IID\tsex", lambda s, reg, sex, chol, hcm: (s, f"{sex:g}")),
        "plink_regions": ("plink-regions.tsv", "#IID\tregion", lambda s, reg, sex, chol, hcm: (s, reg)),
        "populations": ("populations.txt", None, lambda s, reg, sex, chol, hcm: (s, reg)),
    }
    paths = {}
    for name, (file, header, fields) in tables.items():
        paths[name] = str(inputs / file)
        with open(paths[name], "w") as f:
            if header:
                f.write(header + "\n")
            f.writelines("\t".join(map(str, fields(*row))) + "\n" for row in rows)
    return paths


def vcf_contigs(path: str) -> list[list]:
    contigs = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            if not line.startswith("##"):
                break
            if line.startswith("##contig=<"):
                fields = dict(f.split("=", 1) for f in line.strip()[len("##contig=<"):-1].split(","))
                contigs.append([fields["ID"], int(fields["length"])])
    return contigs


def versions() -> dict:
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "missing"

    import dask
    import distributed
    import numpy

    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    try:
        from importlib.metadata import version

        hail_version = version("hail")
        pyspark = version("pyspark")
    except Exception:  # noqa: BLE001
        hail_version = pyspark = "missing"
    import psutil

    return {"python": platform.python_version(), "hail": hail_version, "pyspark": pyspark,
            "dask": dask.__version__, "distributed": distributed.__version__, "numpy": numpy.__version__,
            "java": java[0] if java else "missing", "plink2": first_line(["plink2", "--version"]),
            "bcftools": first_line(["bcftools", "--version"]), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release()}


def library_state() -> dict:
    """Which ngp_research.cohort was measured: the commit, and a digest of the files as they are on disk."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((ROOT / "ngp_research" / "cohort").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "cohort_uncommitted_changes": git("status", "--short", "--", "ngp_research/cohort").splitlines(),
            "cohort_sources_sha256": digest.hexdigest()[:16]}


def _fmt_t(s):
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def _fmt_m(mb):
    return "-" if mb is None else (f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB")


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"


def summarize(engines: dict) -> dict:
    """Per engine: compute-only and end-to-end totals (wall time summed, memory the peak)."""
    out = {}
    for name, r in engines.items():
        steps = r.get("steps", {})
        compute = [steps[s] for s in STEPS if s in steps]
        e2e = [steps[s] for s in ("startup", "conversion") if s in steps] + compute
        required = STEPS[:4] if name == "bcftools" else STEPS
        complete = all(s in steps for s in required) and "failed" not in r
        out[name] = {
            "compute_s": round(sum(s["wall_s"] for s in compute), 2) if compute else None,
            "compute_peak_mb": max((s["peak_rss_mb"] for s in compute), default=None),
            "end_to_end_s": round(sum(s["wall_s"] for s in e2e), 2) if e2e else None,
            "end_to_end_peak_mb": max((s["peak_rss_mb"] for s in e2e), default=None),
            "complete": complete,
        }
    return out


ENGINE_TITLES = {"ours": "ours", "hail": "plain Hail", "plink2": "PLINK 2", "bcftools": "bcftools"}


def table(engines: dict, totals: dict) -> str:
    """Two Markdown tables, wall time then peak RSS: one row per step, then the two totals, with ratios."""
    names = [n for n in ENGINES if n in engines]
    ratios = [(a, b) for a, b in (("ours", "hail"), ("ours", "plink2")) if a in engines and b in engines]
    rows = []  # (title, {engine: (seconds, MiB)})
    for step in ("startup", "conversion") + STEPS:
        cells = {}
        for n in names:
            s = engines[n].get("steps", {}).get(step)
            cells[n] = (s["wall_s"], s["peak_rss_mb"]) if s else (None, None)
        rows.append((STEP_TITLES[step], cells))
    rows.append(("**compute only**", {n: (totals[n]["compute_s"], totals[n]["compute_peak_mb"]) for n in names}))
    rows.append(("**end to end**", {n: (totals[n]["end_to_end_s"], totals[n]["end_to_end_peak_mb"]) for n in names}))
    out = []
    for index, (what, fmt) in enumerate((("wall time", _fmt_t), ("peak RSS of the process tree", _fmt_m))):
        head = f"| step ({what}) | " + " | ".join(ENGINE_TITLES[n] for n in names)
        head += "".join(f" | {ENGINE_TITLES[a]}/{ENGINE_TITLES[b]}" for a, b in ratios) + " |"
        lines = [head, "|---|" + "---:|" * (len(names) + len(ratios))]
        for title, cells in rows:
            values = {n: cells[n][index] for n in names}
            line = f"| {title} | " + " | ".join(fmt(values[n]) for n in names)
            line += "".join(f" | {_ratio(values[a], values[b])}" for a, b in ratios)
            lines.append(line + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + ("\n\ncompute only = the steps after conversion (time summed, peak the highest); "
                                "end to end = startup + conversion + compute.")


def targets(engines: dict, totals: dict) -> list[str]:
    notes = []
    if "ours" in engines and "hail" in engines and totals["ours"]["compute_s"] and totals["hail"]["compute_s"]:
        r = totals["ours"]["compute_s"] / totals["hail"]["compute_s"]
        notes.append(f"compute only, ours <= plain Hail: {'MET' if r <= 1 else 'MISSED'} "
                     f"(ours/Hail = {r:.2f}x)")
        slower = [s for s in STEPS if s in engines["ours"]["steps"] and s in engines["hail"]["steps"]
                  and engines["ours"]["steps"][s]["wall_s"] > engines["hail"]["steps"][s]["wall_s"]]
        if slower:
            notes.append("  steps where ours is slower than plain Hail: " + ", ".join(
                f"{s} ({engines['ours']['steps'][s]['wall_s'] / engines['hail']['steps'][s]['wall_s']:.2f}x)"
                for s in slower))
    if "ours" in engines and "plink2" in engines:
        worst = []
        for s in ("conversion",) + STEPS:
            a = engines["ours"]["steps"].get(s)
            b = engines["plink2"]["steps"].get(s)
            if a and b and b["wall_s"] > 0:
                worst.append((a["wall_s"] / b["wall_s"], s))
        over = [(r, s) for r, s in worst if r > 10]
        if worst:
            notes.append(f"no step > 10x PLINK 2: {'MET' if not over else 'MISSED'} (" + ", ".join(
                f"{s} {r:.1f}x" for r, s in sorted(worst, reverse=True)) + ")")
    return notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", default="5", help="number of regions, or comma-separated names")
    ap.add_argument("--samples-per-region", type=int, default=1000)
    ap.add_argument("--variants", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ngp-bench-cohort",
                    help="generated data and run outputs (keep it outside the repository)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke size: {QUICK['regions']} regions x {QUICK['samples_per_region']} samples x "
                         f"{QUICK['variants']} variants")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker-memory", default="3g", help="Java heap of each of our 2 Dask workers' Hail")
    ap.add_argument("--hail-memory", default="6g", help="Java heap (spark.driver.memory) of plain Hail")
    ap.add_argument("--hail-partitions", type=int, default=8,
                    help="min_partitions of plain Hail's import_vcf (its default makes 1 here: one core)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per engine")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each engine, wait up to this long for other processes to leave the cores idle")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (tables, blocks, outputs, logs)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cohort.json")
    # child mode
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--events", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.engine:
        return child_main(args.engine, args.spec, args.events)

    if args.quick:
        args.regions = str(QUICK["regions"])
        args.samples_per_region = QUICK["samples_per_region"]
        args.variants = QUICK["variants"]
    regions = region_names(args.regions)
    engines_wanted = [e for e in args.engines.split(",") if e]
    unknown = set(engines_wanted) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(sorted(unknown))} (known: {', '.join(ENGINES)})")
    workdir = args.workdir.resolve()
    if workdir == ROOT or ROOT in workdir.parents:
        raise SystemExit(f"--workdir: {workdir} is inside the repository; use a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)

    n_samples = len(regions) * args.samples_per_region
    library = library_state()
    print(f"cohort benchmark: {len(regions)} regions x {args.samples_per_region} samples = {n_samples} samples, "
          f"{args.variants} variants; work folder {workdir}", flush=True)
    data = ensure_data(workdir, regions, args.samples_per_region, args.variants, args.seed)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    inputs = write_inputs(data, rundir)
    spec = {"datasets": [{k: d[k] for k in ("name", "region", "vcf", "sha256", "metadata")} for d in data["datasets"]],
            "merged_vcf": str(rundir / "inputs" / "merged.vcf.gz"), "rundir": str(rundir),
            "contigs": vcf_contigs(data["datasets"][0]["vcf"]), "worker_memory": args.worker_memory,
            "hail_memory": args.hail_memory, "hail_partitions": args.hail_partitions, **inputs}
    spec_path = rundir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    vcf_mb = sum(Path(d["vcf"]).stat().st_size for d in data["datasets"]) / 1e6

    print("engines, one at a time (each its own process tree):", flush=True)
    waits = {"merge": wait_idle(args.wait_idle, sys.stdout)}
    merge = run_engine("merge", spec_path, rundir, args.timeout, sys.stdout)
    engines = {}
    for name in engines_wanted:
        waits[name] = wait_idle(args.wait_idle, sys.stdout)
        engines[name] = run_engine(name, spec_path, rundir, args.timeout, sys.stdout)
    totals = summarize(engines)

    result = {
        "date": datetime.date.today().isoformat(),
        "regions": regions, "samples": n_samples, "variants": args.variants, "seed": args.seed,
        "vcf_mb": round(vcf_mb, 1),
        "merged_vcf_mb": round(Path(spec["merged_vcf"]).stat().st_size / 1e6, 1)
        if Path(spec["merged_vcf"]).exists() else None,
        "simulate_s": data.get("simulate_s"),
        "machine": versions(),
        "library": library,
        "idle_waits_s": waits,
        "settings": {"threads": THREADS, "our_workers": THREADS, "our_worker_heap": args.worker_memory,
                     "hail_master": f"local[{THREADS}]", "hail_driver_heap": args.hail_memory,
                     "hail_import_min_partitions": args.hail_partitions,
                     "rss_sample_interval_s": 0.1},
        "merge": merge, "engines": engines, "totals": totals,
    }
    text = table(engines, totals)
    result["table_markdown"] = text
    result["targets"] = targets(engines, totals)

    print()
    print(f"{n_samples} samples x {args.variants} variants ({len(regions)} regions; regional VCFs {vcf_mb:.0f} MB); "
          f"wall time and peak RSS of each engine's whole process tree:")
    print(text)
    m = merge.get("steps", {}).get("merge")
    if m:
        print(f"bcftools merge of the regional VCFs (the peers' input, not in their totals): "
              f"{_fmt_t(m['wall_s'])}, {_fmt_m(m['peak_rss_mb'])}")
    for name, r in engines.items():
        if "failed" in r:
            print(f"{name} FAILED at step {r['failed']['step']}: {r['failed']['error']}")
        if r.get("leftover_processes"):
            print(f"{name}: {r['leftover_processes']} processes were still running after its child exited "
                  "(killed)")
        if r.get("checks"):
            print(f"{name} checks: {json.dumps(r['checks'])}")
        extra = r.get("steps", {}).get("reopen_warm_cache")
        if extra:
            print(f"{name}: reopening the cohort with a warm cache (new cluster, prepare(), variant_qc()): "
                  f"{_fmt_t(extra['wall_s'])}, {_fmt_m(extra['peak_rss_mb'])}")
    contention = [f"{name} {r['other_cores']:.2f}" for name, r in engines.items() if r.get("other_cores") is not None]
    if contention:
        print("CPU used by other processes on the machine while each engine ran (cores, on average): "
              + ", ".join(contention))
    for note in result["targets"]:
        print(note)
    if args.keep:
        print(f"run folder kept: {rundir}")
    else:
        shutil.rmtree(rundir, ignore_errors=True)
    save(args.out, result)
    if args.out:
        print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(outcome if isinstance(outcome, int) else 0)

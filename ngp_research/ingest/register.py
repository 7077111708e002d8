"""Registering a dataset into a region's protected area, whole or not at all.

:func:`plan_ingest` (pure) decides which offered files become which stored
files and refuses unsafe names; :func:`ingest_dataset` carries the plan out:

1. the acting user must administer the region (checked before any file is read);
2. every file is copied into a staging folder inside the region's area, hashed
   (sha256) while copying, and fsynced;
3. the *staged copies* are validated with htslib (:mod:`ngp_research.ingest.checks`),
   so what is registered is exactly what was checked;
4. in one catalog transaction the dataset, its files and samples are recorded,
   the audit record is appended, the staging folder is renamed to
   ``regions/<region>/datasets/<name>`` and made read-only; then the
   transaction commits.

Any failure removes the staging folder and rolls the transaction back, so
the catalog and the region's area are exactly as before.
"""

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from ..audit.records import AuditRecord
from ..catalog.models import Dataset, DatasetFile, Sample
from ..errors import IngestError, InvalidInputError
from ..names import check_name
from . import checks

DATA_SUFFIXES = {
    ".vcf.gz": "vcf",
    ".vcf.bgz": "vcf",
    ".bcf": "bcf",
    ".bam": "bam",
    ".cram": "cram",
}
INDEX_SUFFIXES = (".tbi", ".csi", ".bai", ".crai")


@dataclass(frozen=True)
class PlannedFile:
    source: Path  # as offered
    name: str  # name inside the dataset folder
    role: str  # data | index | reference | metadata
    index_for: str | None = None  # name of the data file this indexes


def _safe_source(path, what: str) -> Path:
    """The offered path, refused if it is not a regular file or a symlink leaving its folder."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise IngestError(p, f"{what} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        target = p.resolve()
        if target.parent != p.absolute().parent.resolve():
            raise IngestError(p, f"{what} is a symlink pointing outside its folder (to {target}); refused")
        st = os.stat(target)
    if not stat.S_ISREG(st.st_mode):
        raise IngestError(p, f"{what} is not a regular file")
    return p


def _name_of(path: Path, what: str) -> str:
    try:
        return check_name(path.name, f"{what} name")
    except ValueError as e:
        raise IngestError(path, str(e)) from None


def plan_ingest(files, metadata=None, reference=None) -> list[PlannedFile]:
    """Pair each data file with its index; add metadata and reference. Pure apart from ``lstat``.

    Index files may be offered among ``files``; otherwise the index is looked
    up next to the data file under its usual names.
    """
    offered = [Path(f) for f in files]
    if not offered:
        raise InvalidInputError("FILE: give at least one data file")
    for f in offered:
        if ".." in f.parts:
            raise IngestError(f, "file name contains '..'; refused")
    indexes = {f.name: f for f in offered if f.name.endswith(INDEX_SUFFIXES)}
    data = [f for f in offered if not f.name.endswith(INDEX_SUFFIXES)]
    if not data:
        raise InvalidInputError("FILE: only index files were given; give the data file too")
    plan, used = [], set()
    for f in data:
        _safe_source(f, "data file")
        name = _name_of(f, "data file")
        kind = checks.detect_kind(f)
        index = None
        for candidate in checks.expected_index_names(f, kind):
            cname = Path(candidate).name
            if cname in indexes:
                index = indexes[cname]
                break
            if Path(candidate).exists():
                index = Path(candidate)
                break
        if index is None:
            wanted = " or ".join(Path(c).name for c in checks.expected_index_names(f, kind))
            raise IngestError(f, f"no index found; expected {wanted} next to it")
        _safe_source(index, "index file")
        used.add(index.name)
        plan.append(PlannedFile(f, name, "data"))
        plan.append(PlannedFile(index, _name_of(index, "index file"), "index", index_for=name))
    unused = set(indexes) - used
    if unused:
        raise IngestError(sorted(unused)[0], "index file does not belong to any data file given")
    if reference is not None:
        ref = _safe_source(reference, "reference")
        plan.append(PlannedFile(ref, _name_of(ref, "reference"), "reference"))
        fai = Path(str(ref) + ".fai")
        if fai.exists():
            plan.append(PlannedFile(_safe_source(fai, "reference index"), _name_of(fai, "reference index"), "index",
                                    index_for=ref.name))
    if metadata is not None:
        meta = _safe_source(metadata, "metadata")
        plan.append(PlannedFile(meta, _name_of(meta, "metadata"), "metadata"))
    names = [p.name for p in plan]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise IngestError(sorted(dupes)[0], "two files offered under the same name")
    return plan


def _copy_and_hash(source: Path, dest: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(source, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(folder: Path) -> None:
    for p in folder.iterdir():
        os.chmod(p, 0o444)
    os.chmod(folder, 0o555)


def _remove_tree(folder: Path) -> None:
    if not folder.exists():
        return
    os.chmod(folder, 0o755)
    for p in folder.iterdir():
        os.chmod(p, 0o644)
    shutil.rmtree(folder)


def ingest_dataset(catalog, region: str, name: str, files, actor: str | None, metadata=None, reference=None):
    """Validate and register a dataset into ``region``'s protected area.

    Parameters
    ----------
    catalog : ngp_research.catalog.Catalog
    region : str
        The owning region; ``actor`` must be its admin.
    name : str
        The dataset's name, unique on the platform; becomes its folder name.
    files : list of path
        Data files (VCF.gz/BCF/BAM/CRAM), with or without their index files.
    actor : str
        The region admin doing the ingest.
    metadata : path, optional
        A GA4GH Phenopacket v2 ``Cohort`` JSON whose subjects are exactly the files' samples.
    reference : path, optional
        The reference FASTA a CRAM was written against (required for CRAM).

    Returns
    -------
    Dataset
        The registered dataset, with its files and samples loaded.
    """
    try:
        check_name(name, "dataset name")
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    with catalog.session() as s:
        catalog._region(s, region)
        catalog.require_region_admin(s, actor, region, f"ingest into region {region!r}")
        if s.scalar(select(Dataset).where(Dataset.name == name)) is not None:
            raise InvalidInputError(f"dataset {name!r} already exists")

    plan = plan_ingest(files, metadata=metadata, reference=reference)
    platform = catalog.platform
    final = platform.dataset_dir(region, name)
    if final.exists():
        raise InvalidInputError(f"dataset folder for {name!r} already exists in region {region!r}")
    staging_root = platform.staging_dir(region)
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = staging_root / f"{name}.{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    moved = False
    try:
        stored = {}
        for item in plan:
            size, digest = _copy_and_hash(item.source, staging / item.name)
            stored[item.name] = (size, digest)
        facts, kinds = _validate_staged(plan, staging)
        meta_facts = None
        metas = [p for p in plan if p.role == "metadata"]
        all_samples = list(dict.fromkeys(s for f in facts for s in f.samples))
        if metas:
            try:
                meta_facts = checks.validate_metadata(staging / metas[0].name, all_samples)
            except IngestError as e:
                raise IngestError(metas[0].source, e.problem, e.location) from None
        if len(set(kinds)) != 1:
            raise InvalidInputError(f"a dataset holds files of one kind; got {', '.join(sorted(set(kinds)))}")
        builds = {f.genome_build for f in facts if f.genome_build}

        with catalog.change() as s:
            acting = catalog.require_region_admin(s, actor, region, f"ingest into region {region!r}")
            if s.scalar(select(Dataset).where(Dataset.name == name)) is not None:
                raise InvalidInputError(f"dataset {name!r} already exists")
            now = catalog.clock()
            ds = Dataset(
                name=name,
                region=catalog._region(s, region),
                kind=kinds[0],
                genome_build=builds.pop() if len(builds) == 1 else None,
                registered_at=now,
                registered_by=acting,
                individual_metadata=json.dumps(meta_facts.document, sort_keys=True) if meta_facts else None,
            )
            by_name = {}
            for item in plan:
                size, digest = stored[item.name]
                row = DatasetFile(name=item.name, role=item.role, size=size, sha256=digest)
                by_name[item.name] = row
                ds.files.append(row)
            for item in plan:
                if item.index_for:
                    by_name[item.name].index_for = by_name[item.index_for]
            for sample in all_samples:
                ds.samples.append(
                    Sample(
                        sample_id=sample,
                        sex=meta_facts.sexes.get(sample) if meta_facts else None,
                        hpo_terms=",".join(meta_facts.hpo_terms.get(sample, ())) if meta_facts else "",
                    )
                )
            s.add(ds)
            s.record(
                AuditRecord(
                    "dataset.ingest",
                    catalog.actor_label(actor),
                    region=region,
                    dataset=name,
                    detail={
                        "kind": kinds[0],
                        "files": {n: {"size": v[0], "sha256": v[1]} for n, v in stored.items()},
                        "samples": len(all_samples),
                        "records": sum(f.records for f in facts),
                    },
                    
                )
            )
            s.flush()  # a name taken meanwhile by a concurrent ingest fails here, before any rename
            # Still inside the transaction: if the rename fails, nothing is committed.
            _make_read_only(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            moved = True
            _fsync_dir(final.parent)
    except BaseException:
        _remove_tree(staging)
        if moved:
            _remove_tree(final)
        raise
    finally:
        try:
            staging_root.rmdir()  # only when empty: another ingest may be staging
        except OSError:
            pass
    return catalog.dataset(name)


def _validate_staged(plan, staging: Path):
    facts, kinds = [], []
    ref = next((p for p in plan if p.role == "reference"), None)
    for item in plan:
        if item.role != "data":
            continue
        index = next(p for p in plan if p.index_for == item.name)
        path, index_path = staging / item.name, staging / index.name
        try:
            kind = checks.detect_kind(path)
            if kind in ("vcf", "bcf"):
                f = checks.inspect_variant_file(path, index_path)
            else:
                if kind == "cram" and ref is None:
                    raise IngestError(item.source, "a CRAM file needs its reference; give --reference FASTA")
                f = checks.inspect_alignment_file(path, index_path, reference=staging / ref.name if ref else None)
        except IngestError as e:
            # Name the file as the admin offered it, not the staged copy.
            offered = {str(staging / p.name): str(p.source) for p in plan}
            raise IngestError(offered.get(e.file, e.file), e.problem, e.location) from None
        facts.append(f)
        kinds.append(f.kind)
    return facts, kinds

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

INDEX_SUFFIXES = (".tbi", ".csi", ".bai", ".crai")


#: Host folders no offered file may come from, besides the platform's home.
FORBIDDEN_SOURCES = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class PlannedFile:
    source: Path  # as offered
    name: str  # name inside the dataset folder
    role: str  # data | index | reference | metadata
    index_for: str | None = None  # name of the data file this indexes
    resolved: Path | None = None  # the real file, every symlink resolved
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) checked at planning, checked again at copy


def _safe_source(path, what: str, forbidden=()) -> tuple[Path, Path, tuple[int, int]]:
    """Check an offered file; return (offered path, real path, (device, inode)).

    Refused: a missing or non-regular file; a symlink whose target leaves the
    link's folder; any file whose real path lies in the platform's home (the
    regions' areas, the state with its keys) or in /proc, /sys or /dev; a file
    with other hard links (it could be another region's stored file).
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise IngestError(p, f"{what} does not exist") from None
    except OSError as e:
        raise IngestError(p, f"{what} cannot be read ({e.strerror})") from None
    try:
        resolved = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise IngestError(p, f"{what} cannot be resolved ({e})") from None
    if stat.S_ISLNK(st.st_mode) and resolved.parent != p.absolute().parent.resolve():
        raise IngestError(p, f"{what} is a symlink pointing outside its folder (to {resolved}); refused")
    for root in (*forbidden, *FORBIDDEN_SOURCES):
        root = Path(root).resolve()
        if resolved == root or resolved.is_relative_to(root):
            raise IngestError(p, f"{what} lies inside {root}, which ingest never reads from; refused")
    st = os.stat(resolved)
    if not stat.S_ISREG(st.st_mode):
        raise IngestError(p, f"{what} is not a regular file")
    if st.st_nlink > 1:
        raise IngestError(p, f"{what} has {st.st_nlink} hard links; ingest copies only files with one "
                             "(copy it first)")
    return p, resolved, (st.st_dev, st.st_ino)


def _planned(path, name_what: str, role: str, forbidden, index_for=None) -> PlannedFile:
    p, resolved, identity = _safe_source(path, name_what, forbidden)
    return PlannedFile(p, _name_of(p, name_what), role, index_for=index_for, resolved=resolved, identity=identity)


def _name_of(path: Path, what: str) -> str:
    try:
        return check_name(path.name, f"{what} name")
    except ValueError as e:
        raise IngestError(path, str(e)) from None


def plan_ingest(files, metadata=None, reference=None, forbidden=()) -> list[PlannedFile]:
    """Pair each data file with its index; add metadata and, for CRAM, the reference.

    Index files may be offered among ``files``; otherwise the index is looked
    up next to the data file under its usual names. ``forbidden`` lists host
    folders no file may come from (the platform's home).
    """
    offered = [Path(f) for f in files]
    if not offered:
        raise InvalidInputError("FILE: give at least one data file")
    for f in offered + [Path(x) for x in (metadata, reference) if x is not None]:
        if ".." in f.parts:
            raise IngestError(f, "path contains '..'; refused")
    indexes = {f.name: f for f in offered if f.name.endswith(INDEX_SUFFIXES)}
    data = [f for f in offered if not f.name.endswith(INDEX_SUFFIXES)]
    if not data:
        raise InvalidInputError("FILE: only index files were given; give the data file too")
    plan, used, kinds = [], set(), set()
    for f in data:
        item = _planned(f, "data file", "data", forbidden)
        kind = checks.detect_kind(item.resolved)
        kinds.add(kind)
        index = None
        for candidate in checks.expected_index_names(f, kind):
            cname = Path(candidate).name
            if cname in indexes:
                index = indexes[cname]
                break
            if os.path.lexists(candidate):
                index = Path(candidate)
                break
        if index is None:
            wanted = " or ".join(Path(c).name for c in checks.expected_index_names(f, kind))
            raise IngestError(f, f"no index found; expected {wanted} next to it")
        used.add(index.name)
        plan.append(item)
        plan.append(_planned(index, "index file", "index", forbidden, index_for=item.name))
    unused = set(indexes) - used
    if unused:
        raise IngestError(sorted(unused)[0], "index file does not belong to any data file given")
    if reference is not None:
        if kinds != {"cram"}:
            raise InvalidInputError("--reference: a reference is declared only for CRAM files")
        ref = _planned(reference, "reference", "reference", forbidden)
        plan.append(ref)
        fai = Path(str(reference) + ".fai")
        if not os.path.lexists(fai):
            raise IngestError(reference, "the reference has no .fai index next to it (samtools faidx)")
        plan.append(_planned(fai, "reference index", "index", forbidden, index_for=ref.name))
    if metadata is not None:
        plan.append(_planned(metadata, "metadata", "metadata", forbidden))
    names = [p.name for p in plan]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise IngestError(sorted(dupes)[0], "two files offered under the same name")
    return plan


def _copy_and_hash(item: PlannedFile, dest: Path) -> tuple[int, str]:
    """Copy the very file that was checked (no symlink followed, same device and inode), hashing it."""
    h = hashlib.sha256()
    size = 0
    try:
        fd = os.open(item.resolved, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise IngestError(item.source, f"cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != item.identity:
            raise IngestError(item.source, "changed while being ingested (replaced by another file); refused")
        with open(dest, "xb") as fout:
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


def _remove_stale_staging(staging_root: Path) -> None:
    """Remove staging folders left by ingests whose process no longer runs (a hard kill, a power cut)."""
    for child in staging_root.iterdir():
        parts = child.name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            _remove_tree(child)
        except PermissionError:
            pass  # alive, owned by someone else


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

    plan = plan_ingest(files, metadata=metadata, reference=reference, forbidden=(catalog.platform.home_path,))
    platform = catalog.platform
    final = platform.dataset_dir(region, name)
    if final.exists():
        raise InvalidInputError(
            f"a folder for dataset {name!r} exists in region {region!r} but the catalog has no such dataset "
            f"(left by an interrupted ingest?); an operator must inspect and remove {final}"
        )
    staging_root = platform.staging_dir(region)
    staging_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(staging_root)
    staging = staging_root / f"{name}.{os.getpid()}.{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    moved = False
    try:
        stored = {}
        for item in plan:
            size, digest = _copy_and_hash(item, staging / item.name)
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
    if ref is not None:
        fai = next(p for p in plan if p.index_for == ref.name)
        try:
            checks.inspect_reference(staging / ref.name, staging / fai.name)
        except IngestError as e:
            offered = {str(staging / p.name): str(p.source) for p in plan}
            raise IngestError(offered.get(e.file, e.file), e.problem, e.location) from None
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

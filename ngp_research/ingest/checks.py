"""Validation of genomic files offered for ingest.

These functions are pure checks: they read the (staged) files they are
given, never copy or register anything, and raise
:class:`ngp_research.errors.IngestError` naming the file, the problem and,
where it applies, the location in the file.

Supported kinds are bgzip-compressed VCF (``vcf``), BCF (``bcf``), BAM
(``bam``) and CRAM (``cram``); genomic files must come with an index
(see :func:`expected_index_names`).  Sample metadata is one GA4GH
Phenopacket v2 ``Cohort`` document in proto3 JSON
(see :func:`validate_metadata`).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pysam
from google.protobuf import json_format
from phenopackets import Cohort

from ngp_research.errors import IngestError

__all__ = [
    "FileFacts",
    "MetadataFacts",
    "detect_kind",
    "expected_index_names",
    "check_bgzf",
    "inspect_variant_file",
    "inspect_alignment_file",
    "validate_metadata",
]

#: The standard 28-byte empty BGZF block that must end every BGZF file.
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_LISTED = 5


@dataclass(frozen=True)
class FileFacts:
    """What validation learnt about a genomic file.

    Attributes
    ----------
    kind : str
        ``"vcf"``, ``"bcf"``, ``"bam"`` or ``"cram"``.
    samples : tuple of str
        VCF/BCF header samples; for BAM/CRAM the ``SM`` tags of the ``@RG``
        lines (unique, in header order).
    contigs : tuple of str
        Contigs that have at least one record, in file order.
    records : int
        Number of records (variants or alignments) read.
    genome_build : str or None
        Genome build guessed from the header, or None.
    """

    kind: str
    samples: tuple[str, ...]
    contigs: tuple[str, ...]
    records: int
    genome_build: str | None


@dataclass(frozen=True)
class MetadataFacts:
    """What validation learnt about a phenopacket Cohort metadata file.

    Attributes
    ----------
    individuals : int
        Number of cohort members.
    sexes : dict of str to str
        Subject id to sex (``"MALE"``, ``"FEMALE"``, ``"OTHER_SEX"``, ``"UNKNOWN_SEX"``).
    hpo_terms : dict of str to tuple of str
        Subject id to observed (not excluded) HPO term ids.
    document : dict
        The parsed JSON document, for storing in the catalog.
    """

    individuals: int
    sexes: dict[str, str]
    hpo_terms: dict[str, tuple[str, ...]]
    document: dict


# --------------------------------------------------------------------------
# helpers


def _name(path) -> str:
    return str(path)


def _listing(items, limit=_MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


@contextlib.contextmanager
def _htslib_quiet():
    """Silence htslib's stderr chatter (we raise our own errors instead)."""
    previous = pysam.set_verbosity(0)
    try:
        yield
    finally:
        pysam.set_verbosity(previous)


@contextlib.contextmanager
def _no_remote_reference():
    """Stop htslib from looking CRAM references up on the network.

    htslib's default ``REF_PATH`` points at the EBI reference server; inside
    a trusted research environment a reference mismatch must fail, not leak
    checksums to the internet.  An operator-set ``REF_PATH`` is respected.
    """
    saved = {k: os.environ.get(k) for k in ("REF_PATH", "REF_CACHE")}
    if saved["REF_PATH"] is None:
        os.environ["REF_PATH"] = os.path.join(os.devnull, "%s")
    if saved["REF_CACHE"] is None:
        os.environ["REF_CACHE"] = os.path.join(os.devnull, "%s")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _require_file(path, what="file"):
    p = Path(path)
    if not p.is_file():
        raise IngestError(path, f"{what} does not exist or is not a regular file")
    if p.stat().st_size == 0:
        raise IngestError(path, f"{what} is empty")


def _first_block_bytes(path, n=65536) -> bytes:
    """Decompress (leniently) the start of a gzip/BGZF file."""
    with open(path, "rb") as fh:
        raw = fh.read(n + 1024)
    try:
        return zlib.decompressobj(wbits=31).decompress(raw, n)
    except zlib.error:
        return b""


# --------------------------------------------------------------------------
# kind and index names


def detect_kind(path) -> str:
    """Detect the kind of a genomic file from its content.

    Parameters
    ----------
    path : str or os.PathLike
        The file to look at.

    Returns
    -------
    str
        ``"vcf"`` (bgzip-compressed VCF), ``"bcf"``, ``"bam"`` or ``"cram"``.

    Raises
    ------
    IngestError
        If the file is missing, plain-text VCF, or not a supported kind.
    """
    _require_file(path)
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"CRAM"):
        return "cram"
    if head.startswith(_GZIP_MAGIC):
        data = _first_block_bytes(path, 64)
        if data.startswith(b"BAM\x01"):
            return "bam"
        if data.startswith(b"BCF\x02"):
            return "bcf"
        if data.startswith(b"##fileformat=VCF"):
            return "vcf"
        raise IngestError(path, "not a supported genomic file (gzip-compressed, but not VCF, BCF or BAM)")
    if head.startswith(b"##fileformat=VCF"):
        raise IngestError(path, "plain-text VCF: it must be bgzip-compressed (bgzip, then tabix -p vcf)")
    if head.startswith(b"BCF\x02"):
        raise IngestError(path, "uncompressed BCF: it must be BGZF-compressed (bcftools view -Ob)")
    if head.startswith(b"@HD") or head.startswith(b"@SQ"):
        raise IngestError(path, "SAM text is not accepted: convert it to BAM or CRAM")
    raise IngestError(path, "not a supported genomic file (expected VCF.gz, BCF, BAM or CRAM)")


def expected_index_names(path, kind) -> list[str]:
    """Candidate index file names next to a genomic file, in order of preference.

    Parameters
    ----------
    path : str or os.PathLike
        The genomic file.
    kind : str
        Its kind, as returned by :func:`detect_kind`.

    Returns
    -------
    list of str
        Paths (in the file's directory) where its index may be found.
    """
    p = str(path)
    stem = os.path.splitext(p)[0]
    if kind == "vcf":
        return [p + ".tbi", p + ".csi"]
    if kind == "bcf":
        return [p + ".csi"]
    if kind == "bam":
        return [p + ".bai", stem + ".bai", p + ".csi", stem + ".csi"]
    if kind == "cram":
        return [p + ".crai", stem + ".crai"]
    raise ValueError(f"unknown kind {kind!r}")


# --------------------------------------------------------------------------
# BGZF


def check_bgzf(path) -> None:
    """Check a BGZF file block by block, from the start to the EOF block.

    Every block must have the gzip magic, the ``BC`` extra subfield with
    ``BSIZE``, inflate cleanly and match its CRC32 and ISIZE; the file must
    end with exactly the standard 28-byte BGZF EOF block.

    Parameters
    ----------
    path : str or os.PathLike
        A VCF.gz, BCF or BAM file.

    Raises
    ------
    IngestError
        With location ``"BGZF block at byte N"`` for a bad block.
    """
    _require_file(path)
    size = os.path.getsize(path)
    last_block = None
    with open(path, "rb") as fh:
        offset = 0
        while offset < size:
            where = f"BGZF block at byte {offset}"
            header = fh.read(12)
            if len(header) < 12:
                raise IngestError(path, "truncated: incomplete BGZF block header", where)
            if header[:2] != _GZIP_MAGIC:
                if offset == 0:
                    if header.startswith(b"##fileformat=VCF") or header.startswith(b"#"):
                        raise IngestError(path, "plain-text VCF: it must be bgzip-compressed (bgzip, then tabix -p vcf)")
                    raise IngestError(path, "not BGZF-compressed (no gzip magic)", where)
                raise IngestError(path, "corrupt BGZF block (bad gzip magic)", where)
            cm, flg = header[2], header[3]
            if cm != 8 or not flg & 0x04:
                raise IngestError(path, "not BGZF-compressed (plain gzip?)", where)
            xlen = struct.unpack_from("<H", header, 10)[0]
            extra = fh.read(xlen)
            if len(extra) < xlen:
                raise IngestError(path, "truncated: incomplete BGZF block header", where)
            bsize = None
            pos = 0
            while pos + 4 <= xlen:
                si1, si2, slen = extra[pos], extra[pos + 1], struct.unpack_from("<H", extra, pos + 2)[0]
                if si1 == 66 and si2 == 67 and slen == 2 and pos + 6 <= xlen:
                    bsize = struct.unpack_from("<H", extra, pos + 4)[0] + 1
                pos += 4 + slen
            if bsize is None:
                raise IngestError(path, "not BGZF-compressed (plain gzip?): no BC extra subfield", where)
            cdata_len = bsize - 12 - xlen - 8
            if cdata_len < 0:
                raise IngestError(path, "corrupt BGZF block (BSIZE too small)", where)
            if offset + bsize > size:
                raise IngestError(path, "truncated: BGZF block runs past the end of the file "
                                        "(missing BGZF EOF block)", where)
            cdata = fh.read(cdata_len)
            trailer = fh.read(8)
            crc, isize = struct.unpack("<II", trailer)
            try:
                inflater = zlib.decompressobj(-15)
                data = inflater.decompress(cdata)
                data += inflater.flush()
            except zlib.error as exc:
                raise IngestError(path, f"corrupt BGZF block (deflate error: {exc})", where) from None
            if not inflater.eof:
                raise IngestError(path, "corrupt BGZF block (incomplete deflate stream)", where)
            if zlib.crc32(data) != crc:
                raise IngestError(path, "corrupt BGZF block (CRC mismatch)", where)
            if len(data) != isize:
                raise IngestError(path, "corrupt BGZF block (ISIZE mismatch)", where)
            last_block = (offset, header + extra + cdata + trailer)
            offset += bsize
    if last_block is None or last_block[1] != BGZF_EOF:
        raise IngestError(path, "truncated: missing BGZF EOF block",
                          f"end of file (byte {size})")


# --------------------------------------------------------------------------
# genome build


_BUILD_PATTERNS = [
    (re.compile(r"GRCh38|hg38|GCA_000001405\.15|hs38", re.I), "GRCh38"),
    (re.compile(r"GRCh37|hg19|hs37d5|human_g1k_v37|\bb37\b|GCA_000001405\.1\b", re.I), "GRCh37"),
    (re.compile(r"T2T|CHM13", re.I), "T2T-CHM13"),
]
_CHR1_LENGTHS = {248956422: "GRCh38", 249250621: "GRCh37", 248387328: "T2T-CHM13"}


def _guess_build(texts, contig_lengths) -> str | None:
    for text in texts:
        for pattern, build in _BUILD_PATTERNS:
            if text and pattern.search(text):
                return build
    for name in ("chr1", "1"):
        if name in contig_lengths and contig_lengths[name] in _CHR1_LENGTHS:
            return _CHR1_LENGTHS[contig_lengths[name]]
    return None


# --------------------------------------------------------------------------
# variant files


_FIXED_COLUMNS = ["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]


def _read_vcf_header_text(path, kind) -> list[str]:
    """Return the header lines (``##...`` and ``#CHROM``) of a VCF.gz or BCF."""
    with gzip.open(path, "rb") as fh:
        if kind == "bcf":
            magic = fh.read(5)
            if magic[:3] != b"BCF":
                raise IngestError(path, "not a BCF file (bad magic)")
            (l_text,) = struct.unpack("<I", fh.read(4))
            text = fh.read(l_text).rstrip(b"\0").decode("utf-8", "replace")
            return text.splitlines()
        lines = []
        for raw in fh:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.startswith("#"):
                break
            lines.append(line)
            if line.startswith("#CHROM"):
                break
        return lines


def _parse_chrom_line(path, header_lines) -> tuple[list[str], list[str]]:
    """Check the ``#CHROM`` line; return (columns, samples)."""
    if not header_lines or not header_lines[-1].startswith("#CHROM"):
        raise IngestError(path, "VCF header has no #CHROM line", f"line {len(header_lines) + 1}")
    line_no = len(header_lines)
    cols = header_lines[-1].split("\t")
    if cols[:8] != _FIXED_COLUMNS:
        raise IngestError(path, "malformed #CHROM line (columns must be tab-separated "
                                + "\\t".join(_FIXED_COLUMNS) + ")", f"line {line_no}")
    samples = cols[9:]
    if len(cols) > 8 and cols[8] != "FORMAT":
        raise IngestError(path, "malformed #CHROM line (9th column must be FORMAT)", f"line {line_no}")
    if any(not s for s in samples):
        raise IngestError(path, "empty sample ID in #CHROM line", f"line {line_no}")
    seen, dups = set(), []
    for s in samples:
        if s in seen and s not in dups:
            dups.append(s)
        seen.add(s)
    if dups:
        raise IngestError(path, f"duplicate sample IDs in header: {_listing(dups)}", f"line {line_no}")
    return cols, samples


_GT_SPLIT = re.compile(r"[/|]")
_GT_ONLY_TEXT = re.compile(r"[0-9./|\t]*")
_DIGITS = re.compile(r"[0-9]+")


_TWO_DIGITS = re.compile(r"[0-9][0-9]")


@functools.lru_cache(maxsize=16)
def _allele_out_of_range(n_alleles):
    """A pattern matching a one-digit allele index >= ``n_alleles`` (n_alleles <= 10), or None."""
    return re.compile(f"[{n_alleles}-9]") if n_alleles < 10 else None


def _check_record_text(line, ncols) -> str | None:
    """Check one VCF data line's text; return a problem or None."""
    cols = line.split("\t")
    if len(cols) != ncols:
        return f"wrong number of columns ({len(cols)}, the header has {ncols})"
    if not cols[1].isdigit():
        return f"non-numeric POS {cols[1]!r}"
    if ncols <= 9:
        return None
    keys = cols[8].split(":")
    if "GT" not in keys:
        return None
    gi = keys.index("GT")
    alt = cols[4]
    n_alleles = 1 + (0 if alt == "." else len(alt.split(",")))
    if len(keys) == 1:
        # Fast path for GT-only records (most cohort VCFs): check all genotypes with two C-level scans,
        # and fall through to the per-sample loop only to name the offending genotype.
        genotypes = line.split("\t", 9)[9]
        if _GT_ONLY_TEXT.fullmatch(genotypes):
            if n_alleles <= 10:
                too_big = _allele_out_of_range(n_alleles)
                if not _TWO_DIGITS.search(genotypes) and (too_big is None or not too_big.search(genotypes)):
                    return None
            else:
                numbers = _DIGITS.findall(genotypes)
                if not numbers or max(map(int, numbers)) < n_alleles:
                    return None
    for col in cols[9:]:
        parts = col.split(":")
        if gi >= len(parts):
            continue
        for allele in _GT_SPLIT.split(parts[gi]):
            if allele in (".", ""):
                continue
            if not allele.isdigit():
                return f"malformed genotype {parts[gi]!r}"
            if int(allele) >= n_alleles:
                return (f"genotype {parts[gi]!r} refers to allele {allele}, "
                        f"but the record has only {n_alleles} alleles")
    return None


def _diagnose_unparsable(line, ncols, exc) -> str:
    if line is not None:
        problem = _check_record_text(line.rstrip("\r\n"), ncols)
        if problem:
            return f"malformed record: {problem}"
    return f"malformed record (htslib: {exc})"


def _index_magic(index_path) -> bytes:
    with open(index_path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == _GZIP_MAGIC:
        return _first_block_bytes(index_path, 4)[:4]
    return head


def _require_index(path, index_path, kind):
    if index_path is None:
        names = ", ".join(os.path.basename(n) for n in expected_index_names(path, kind))
        raise IngestError(path, f"no index: expected one of {names} next to the file")
    if not Path(index_path).is_file():
        raise IngestError(index_path, f"index of {_name(path)} does not exist")


def inspect_variant_file(path, index_path) -> FileFacts:
    """Validate a VCF.gz or BCF file and its index, reading every record.

    Parameters
    ----------
    path : str or os.PathLike
        The VCF.gz or BCF file.
    index_path : str or os.PathLike or None
        Its ``.tbi``/``.csi`` index; None means none was found.

    Returns
    -------
    FileFacts
        Samples, contigs with records, record count and guessed build.

    Raises
    ------
    IngestError
        For a bad compression layer, malformed header or record (location
        ``"record N (line L)"``), unsorted records, duplicate samples, or an
        index that is missing or does not belong to the file.
    """
    kind = detect_kind(path)
    if kind not in ("vcf", "bcf"):
        raise IngestError(path, f"expected a VCF.gz or BCF file, found {kind.upper()}")
    check_bgzf(path)
    _require_index(path, index_path, kind)
    magic = _index_magic(index_path)
    allowed = {b"TBI\x01", b"CSI\x01"} if kind == "vcf" else {b"CSI\x01"}
    if magic not in allowed:
        want = "a .tbi or .csi" if kind == "vcf" else "a .csi"
        raise IngestError(index_path, f"index does not belong to {_name(path)}: not {want} index")

    header_lines = _read_vcf_header_text(path, kind)
    header_cols, samples = _parse_chrom_line(path, header_lines)
    ncols = len(header_cols)
    n_header = len(header_lines)

    def where(n):
        return f"record {n} (line {n_header + n})" if kind == "vcf" else f"record {n}"

    stats: dict[str, list[int]] = {}
    order: list[str] = []
    n = 0
    current = None
    last_pos = 0
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(gzip.open(path, "rb")) if kind == "vcf" else None
        if raw is not None:
            for _ in range(n_header):
                raw.readline()
        try:
            with _htslib_quiet():
                vf = stack.enter_context(pysam.VariantFile(str(path)))
        except (ValueError, OSError) as exc:
            raise IngestError(path, f"unreadable VCF/BCF header (htslib: {exc})") from None
        header = vf.header
        contig_lengths = {c: header.contigs[c].length for c in header.contigs}
        build_texts = [ln for ln in header_lines if ln.startswith(("##reference", "##contig", "##assembly"))]
        if list(header.samples) != samples:
            raise IngestError(path, "sample IDs in the #CHROM line could not be read consistently",
                              f"line {n_header}" if kind == "vcf" else None)
        records = iter(vf)
        while True:
            line = None
            if raw is not None:
                line = raw.readline().decode("utf-8", "replace")
                if line in ("\n", "\r\n"):
                    raise IngestError(path, "empty line among records", where(n + 1))
            try:
                with _htslib_quiet():
                    rec = next(records)
                # htslib parses a VCF line whole (FORMAT included) when it reads it; a BCF record is
                # decoded whole by str(rec) below. Both are then checked as text.
                chrom, pos, alleles = rec.chrom, rec.pos, rec.alleles
                text = line if raw is not None else str(rec)
            except StopIteration:
                if line:
                    raise IngestError(path, _diagnose_unparsable(line, ncols, "unexpected end"), where(n + 1))
                break
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                raise IngestError(path, _diagnose_unparsable(line, ncols, exc), where(n + 1)) from None
            n += 1
            problem = _check_record_text(text.rstrip("\r\n"), ncols)
            if problem:
                raise IngestError(path, f"malformed record: {problem}", where(n))
            if raw is not None:
                cols = text.split("\t", 2)
                if cols[0] != chrom or int(cols[1]) != pos:
                    raise IngestError(path, "malformed record (could not be parsed consistently)", where(n))
            if not alleles or not alleles[0]:
                raise IngestError(path, "malformed record: no REF allele", where(n))
            if chrom != current:
                if chrom in stats:
                    raise IngestError(path, f"records are not sorted: contig {chrom} appears again "
                                            f"after {current}", where(n))
                if chrom not in contig_lengths:
                    contig_lengths[chrom] = None
                stats[chrom] = [0, pos, pos]
                order.append(chrom)
                current, last_pos = chrom, pos
            if pos < last_pos:
                raise IngestError(path, f"records are not sorted: position {chrom}:{pos} comes after "
                                        f"{chrom}:{last_pos}", where(n))
            last_pos = pos
            entry = stats[chrom]
            entry[0] += 1
            entry[2] = pos

    _check_variant_index(path, index_path, list(contig_lengths), stats)
    return FileFacts(
        kind=kind,
        samples=tuple(samples),
        contigs=tuple(order),
        records=n,
        genome_build=_guess_build(build_texts, {k: v for k, v in contig_lengths.items() if v}),
    )


def _index_record_counts(index_path, header_contigs):
    """Read the per-contig record counts htslib stores in a TBI/CSI index.

    htslib keeps, for each reference, a pseudo-bin holding the virtual
    offsets of the first and last record and the number of records.
    Returns ``{contig: (n_records, end_block_offset)}`` for the references
    that have one (older indexers may write none).
    """
    with gzip.open(index_path, "rb") as fh:
        data = fh.read()
    magic, off = data[:4], 4
    if magic == b"TBI\x01":
        n_ref, _, _, _, _, _, _, l_nm = struct.unpack_from("<8i", data, off)
        off += 32
        names = [n.decode() for n in data[off:off + l_nm].split(b"\0")[:n_ref]]
        off += l_nm
        pseudo, has_loff = 37450, False
    else:
        _, depth, l_aux = struct.unpack_from("<3i", data, off)
        off += 12
        aux = data[off:off + l_aux]
        off += l_aux
        (n_ref,) = struct.unpack_from("<i", data, off)
        off += 4
        if l_aux >= 28:
            (l_nm,) = struct.unpack_from("<i", aux, 24)
            names = [n.decode() for n in aux[28:28 + l_nm].split(b"\0")[:n_ref]]
        else:
            names = list(header_contigs)[:n_ref]
        pseudo, has_loff = ((1 << ((depth + 1) * 3)) - 1) // 7 + 1, True
    if len(names) < n_ref:
        raise struct.error("fewer reference names than references")
    counts = {}
    for ref in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, off)
        off += 4
        for _ in range(n_bin):
            (bin_no,) = struct.unpack_from("<I", data, off)
            off += 12 if has_loff else 4
            (n_chunk,) = struct.unpack_from("<i", data, off)
            off += 4
            chunks = struct.unpack_from(f"<{2 * n_chunk}Q", data, off)
            off += 16 * n_chunk
            if bin_no == pseudo and n_chunk >= 2:
                counts[names[ref]] = (chunks[2], chunks[1] >> 16)
        if not has_loff:
            (n_intv,) = struct.unpack_from("<i", data, off)
            off += 4 + 8 * n_intv
    return counts


def _check_variant_index(path, index_path, contigs, stats):
    def wrong(detail):
        return IngestError(index_path, f"index does not belong to {_name(path)} ({detail})")

    try:
        indexed = _index_record_counts(index_path, contigs)
    except (struct.error, OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise wrong(f"it could not be read: {exc}") from None
    size = os.path.getsize(path)
    if indexed:
        for contig in dict.fromkeys([*stats, *indexed]):
            got = indexed.get(contig, (0, 0))[0]
            want = stats.get(contig, [0])[0]
            if got != want:
                raise wrong(f"it records {got} records on {contig}, the file has {want}")
            if indexed.get(contig, (0, 0))[1] > size:
                raise wrong(f"it points past the end of the file on {contig}")

    try:
        with _htslib_quiet(), pysam.VariantFile(str(path), index_filename=str(index_path)) as vf:
            if vf.index is None:
                raise wrong("it could not be loaded")
            for contig in contigs:
                count, first, last = 0, None, None
                try:
                    for rec in vf.fetch(contig):
                        count += 1
                        if first is None:
                            first = rec.pos
                        last = rec.pos
                except ValueError as exc:
                    if contig in stats:
                        raise wrong(f"fetching {contig} failed: {exc}") from None
                    continue
                except OSError as exc:
                    raise wrong(f"fetching {contig} failed: {exc}") from None
                want = stats.get(contig, [0, None, None])
                if count != want[0]:
                    raise wrong(f"it finds {count} records on {contig}, the file has {want[0]}")
                if count and (first, last) != (want[1], want[2]):
                    raise wrong(f"records on {contig} span {first}-{last} through the index, "
                                f"{want[1]}-{want[2]} in the file")
    except (ValueError, OSError) as exc:
        raise wrong(f"it could not be read: {exc}") from None


# --------------------------------------------------------------------------
# alignment files


def inspect_alignment_file(path, index_path, reference=None) -> FileFacts:
    """Validate a BAM or CRAM file and its index, reading every alignment.

    Parameters
    ----------
    path : str or os.PathLike
        The BAM or CRAM file.
    index_path : str or os.PathLike or None
        Its ``.bai``/``.csi``/``.crai`` index; None means none was found.
    reference : str or os.PathLike, optional
        Reference FASTA (with ``.fai``); required for CRAM.

    Returns
    -------
    FileFacts
        ``samples`` are the ``SM`` tags of the ``@RG`` lines.

    Raises
    ------
    IngestError
        For bad compression, undecodable or unsorted alignments (location
        ``"alignment N"``), a missing reference for CRAM, or an index that
        is missing or does not belong to the file.
    """
    kind = detect_kind(path)
    if kind not in ("bam", "cram"):
        raise IngestError(path, f"expected a BAM or CRAM file, found {kind.upper()}")
    open_kw = {"check_sq": False}
    if kind == "cram":
        if reference is None:
            raise IngestError(path, "CRAM needs its reference FASTA to be decoded, and none was given")
        if not Path(reference).is_file():
            raise IngestError(reference, f"reference FASTA for {_name(path)} does not exist")
        if not Path(str(reference) + ".fai").is_file():
            raise IngestError(reference, f"reference FASTA for {_name(path)} has no .fai index "
                                         "(samtools faidx)")
        open_kw["reference_filename"] = str(reference)
    else:
        check_bgzf(path)
    _require_index(path, index_path, kind)
    mode = "rc" if kind == "cram" else "rb"

    counts: dict[str, int] = {}
    order: list[str] = []
    n = 0
    unplaced = 0
    with _no_remote_reference():
        try:
            with _htslib_quiet():
                af = pysam.AlignmentFile(str(path), mode, **open_kw)
        except (ValueError, OSError) as exc:
            raise IngestError(path, f"unreadable {kind.upper()} header (htslib: {exc})") from None
        with af:
            hdr = af.header.to_dict()
            samples = []
            for rg in hdr.get("RG", []):
                sm = rg.get("SM")
                if sm and sm not in samples:
                    samples.append(sm)
            sq = hdr.get("SQ", [])
            build_texts = [str(s.get("AS", "")) for s in sq]
            lengths = {s.get("SN"): s.get("LN") for s in sq}
            last = (-1, -1)
            try:
                with _htslib_quiet():
                    for seg in af.fetch(until_eof=True):
                        n += 1
                        rid, start = seg.reference_id, seg.reference_start
                        seg.query_name, seg.cigartuples, seg.query_sequence, seg.query_qualities
                        seg.get_tags()
                        if rid < 0:
                            unplaced += 1
                            last = (1 << 40, 0)
                            continue
                        key = (rid, start)
                        if key < last:
                            raise IngestError(path, "alignments are not coordinate-sorted: "
                                                    f"{seg.reference_name}:{start + 1} comes after an "
                                                    "alignment further on", f"alignment {n}")
                        last = key
                        name = seg.reference_name
                        if name not in counts:
                            counts[name] = 0
                            order.append(name)
                        counts[name] += 1
            except (ValueError, OSError) as exc:
                raise IngestError(path, f"corrupt or undecodable alignment (htslib: {exc})",
                                  f"alignment {n + 1}") from None
        _check_alignment_index(path, index_path, kind, mode, open_kw, [s.get("SN") for s in sq],
                               counts, unplaced)
    return FileFacts(kind=kind, samples=tuple(samples), contigs=tuple(order), records=n,
                     genome_build=_guess_build(build_texts, lengths))


def _check_alignment_index(path, index_path, kind, mode, open_kw, contigs, counts, unplaced):
    def wrong(detail):
        return IngestError(index_path, f"index does not belong to {_name(path)} ({detail})")

    try:
        with _htslib_quiet(), pysam.AlignmentFile(str(path), mode, index_filename=str(index_path),
                                                  **open_kw) as af:
            if not af.has_index():
                raise wrong("it could not be loaded")
            if kind == "bam":
                for st in af.get_index_statistics():
                    got = st.mapped + st.unmapped
                    want = counts.get(st.contig, 0)
                    if got != want:
                        raise wrong(f"it counts {got} alignments on {st.contig}, the file has {want}")
                if af.nocoordinate != unplaced:
                    raise wrong(f"it counts {af.nocoordinate} unplaced reads, the file has {unplaced}")
            else:
                for contig in contigs:
                    got = sum(1 for _ in af.fetch(contig))
                    want = counts.get(contig, 0)
                    if got != want:
                        raise wrong(f"it finds {got} alignments on {contig}, the file has {want}")
    except (ValueError, OSError) as exc:
        raise wrong(f"it could not be read: {exc}") from None


# --------------------------------------------------------------------------
# metadata

_HPO_ID = re.compile(r"^HP:\d{7}$")
_CURIE = re.compile(r"^[A-Za-z]+:\S+$")
_SEXES = ("MALE", "FEMALE", "OTHER_SEX", "UNKNOWN_SEX")


def validate_metadata(path, samples) -> MetadataFacts:
    """Validate a phenopacket v2 ``Cohort`` metadata file against a file's samples.

    Parameters
    ----------
    path : str or os.PathLike
        One JSON document holding a ``Cohort`` in proto3 JSON.
    samples : iterable of str
        The samples of the genomic file(s) it describes.

    Returns
    -------
    MetadataFacts
        Counts, sexes, observed HPO terms and the parsed document.

    Raises
    ------
    IngestError
        For malformed JSON (with line/column), a document that is not a
        valid Cohort (unknown fields, wrong types), a violation of our own
        rules, or subjects that do not match the samples exactly.
    """
    _require_file(path, "metadata file")
    size = os.path.getsize(path)
    if size > MAX_METADATA_BYTES:
        raise IngestError(path, f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            document = json.load(fh)
    except RecursionError:
        raise IngestError(path, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise IngestError(path, f"metadata is not UTF-8 text ({exc.reason})", f"byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise IngestError(path, f"malformed JSON: {exc.msg}", f"line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(document, dict):
        raise IngestError(path, "metadata must be one JSON object holding a phenopacket Cohort")
    try:
        json_format.ParseDict(document, Cohort(), ignore_unknown_fields=False)
    except RecursionError:
        raise IngestError(path, "not a valid phenopacket v2 Cohort: nested too deeply") from None
    except json_format.ParseError as exc:
        raise IngestError(path, f"not a valid phenopacket v2 Cohort: {str(exc).rstrip('.')}") from None

    meta = document.get("metaData")
    if not isinstance(meta, dict) or not str(meta.get("phenopacketSchemaVersion", "")).startswith("2"):
        raise IngestError(path, 'metaData.phenopacketSchemaVersion must be present and start with "2"',
                          "metaData")
    members = document.get("members") or []
    if not members:
        raise IngestError(path, "the cohort has no members", "members")

    sexes: dict[str, str] = {}
    hpo: dict[str, tuple[str, ...]] = {}
    for i, member in enumerate(members):
        loc = f"members[{i}]"
        if not member.get("id"):
            raise IngestError(path, "phenopacket has no id", loc)
        subject = member.get("subject") or {}
        sid = subject.get("id")
        if not sid:
            raise IngestError(path, "phenopacket has no subject.id", f"{loc}.subject")
        loc = f"{loc} (subject {sid})"
        if sid in sexes:
            raise IngestError(path, f"duplicate subject id {sid}", loc)
        sex = subject.get("sex")
        if sex not in _SEXES:
            raise IngestError(path, "subject.sex must be given as one of " + ", ".join(_SEXES), loc)
        sexes[sid] = sex
        observed = []
        for j, feature in enumerate(member.get("phenotypicFeatures") or []):
            term = (feature.get("type") or {}).get("id", "")
            if not _HPO_ID.match(term):
                raise IngestError(path, f"phenotypic feature type id {term!r} is not an HPO id (HP:0000000)",
                                  f"{loc}.phenotypicFeatures[{j}]")
            if not feature.get("excluded", False) and term not in observed:
                observed.append(term)
        hpo[sid] = tuple(observed)
        for j, disease in enumerate(member.get("diseases") or []):
            term = (disease.get("term") or {}).get("id", "")
            if not _CURIE.match(term):
                raise IngestError(path, f"disease term id {term!r} is not a CURIE (PREFIX:ID)",
                                  f"{loc}.diseases[{j}]")

    wanted = list(dict.fromkeys(samples))
    wanted_set = set(wanted)
    extra = [s for s in sexes if s not in wanted_set]
    if extra:
        raise IngestError(path, f"metadata for {len(extra)} subject(s) not in the genomic file: "
                                f"{_listing(extra)}")
    missing = [s for s in wanted if s not in sexes]
    if missing:
        raise IngestError(path, f"{len(missing)} sample(s) in the genomic file have no metadata: "
                                f"{_listing(missing)}")
    return MetadataFacts(individuals=len(members), sexes=sexes, hpo_terms=hpo, document=document)


#: Metadata larger than this is refused before parsing (about 1 KiB per individual is typical).
MAX_METADATA_BYTES = 512 * 1024 * 1024

_IUPAC = re.compile(r"[ACGTNRYKMSWBDHVacgtnrykmswbdhv*-]*")


def inspect_reference(path, fai_path) -> tuple[str, ...]:
    """Validate a reference FASTA and its ``.fai``: every sequence readable through the index.

    Returns the sequence names. Reads the first and last 1000 bases of each
    sequence through the index, so an index of another FASTA or a file that
    is not FASTA at all is refused.
    """
    _require_file(path, "reference")
    if fai_path is None or not os.path.exists(fai_path):
        raise IngestError(path, "the reference has no .fai index (samtools faidx)")
    try:
        with _htslib_quiet(), open(path, "rb") as f:
            if f.read(1) != b">":
                raise IngestError(path, "not a FASTA file (it must start with '>')")
        with _htslib_quiet(), pysam.FastaFile(str(path), filepath_index=str(fai_path)) as fa:
            names = tuple(fa.references)
            if not names:
                raise IngestError(fai_path, "the reference index lists no sequences")
            for name, length in zip(fa.references, fa.lengths):
                for start in (0, max(0, length - 1000)):
                    seq = fa.fetch(name, start, min(length, start + 1000))
                    if len(seq) != min(length, start + 1000) - start or not _IUPAC.fullmatch(seq):
                        raise IngestError(fai_path, f"does not belong to {_name(path)}: sequence {name} "
                                                    f"cannot be read through it", f"sequence {name}")
            return names
    except (OSError, ValueError) as exc:
        raise IngestError(path, f"unreadable reference FASTA or index (htslib: {exc})") from None

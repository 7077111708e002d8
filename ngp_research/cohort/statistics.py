"""Per-variant and whole-cohort statistics on genotype blocks, with PLINK 2's conventions.

Pure numpy/scipy functions over one block of genotypes: an ``int8`` array of
shape (variants, samples) holding ALT allele counts 0, 1, 2 and ``-1`` for a
missing call. Dask runs them on the workers, one genotype shard at a time
(:mod:`ngp_research.cohort.engine`); nothing here knows about Dask or Hail.

The conventions are PLINK 2's, read from its source and checked against
``plink2`` in the tests:

- Hardy-Weinberg: the two-sided exact test (Wigginton et al. 2005), not mid-p,
  as ``plink2 --hardy``.
- Association: a sample with a missing call is dropped for that variant only
  (``plink2 --glm``); ``missing="mean"`` imputes the variant's mean dosage
  instead, as Hail's ``linear_regression_rows`` does.
- PCA: each variant standardised as (dosage - 2p) / sqrt(2p(1-p)), a missing
  call counts 0, and each sample pair of the relationship matrix is divided by
  the number of variants where both are called (``plink2 --pca``).

Examples
--------
>>> import numpy as np
>>> g = np.array([[0, 1, 2, 1, -1], [2, 2, 2, 1, 0]], dtype=np.int8)
>>> counts = genotype_counts(g)
>>> counts["n_het"].tolist(), counts["n_called"].tolist()
([2, 1], [4, 5])
>>> round(hardy_weinberg_p(n_het=1, n_hom_ref=2, n_hom_var=1), 6)
0.428571
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

__all__ = [
    "MISSING",
    "genotype_counts",
    "sample_counts",
    "hardy_weinberg_p",
    "hardy_weinberg",
    "linear_association",
    "logistic_association",
    "gram_block",
    "relationship_pca",
]

MISSING = -1
_DIVERGED = 30.0  # |log odds| beyond which a logistic fit is taken as separated (not converging)
_TIE = 1 + 1e-7  # relative tolerance for probabilities equal to the observed one (PLINK 2 uses a few ulps more)


def genotype_counts(block: np.ndarray) -> dict:
    """Per-variant call counts of a genotype block.

    Parameters
    ----------
    block : numpy.ndarray of int8, shape (variants, samples)
        ALT allele counts, -1 for missing.

    Returns
    -------
    dict of numpy.ndarray
        ``n_called``, ``n_hom_ref``, ``n_het``, ``n_hom_var``, ``ac`` (ALT
        alleles among called), ``an`` (called alleles, 2 * ``n_called``).

    Examples
    --------
    >>> import numpy as np
    >>> genotype_counts(np.array([[0, 2, -1]], dtype=np.int8))["ac"].tolist()
    [2]
    """
    block = np.asarray(block)
    n_hom_ref = (block == 0).sum(axis=1)
    n_het = (block == 1).sum(axis=1)
    n_hom_var = (block == 2).sum(axis=1)
    n_called = n_hom_ref + n_het + n_hom_var
    return {
        "n_called": n_called,
        "n_hom_ref": n_hom_ref,
        "n_het": n_het,
        "n_hom_var": n_hom_var,
        "ac": n_het + 2 * n_hom_var,
        "an": 2 * n_called,
    }


def sample_counts(block: np.ndarray) -> dict:
    """Per-sample call counts over the variants of a block (add blocks to combine shards).

    Examples
    --------
    >>> import numpy as np
    >>> sample_counts(np.array([[0, 1], [2, -1]], dtype=np.int8))["n_not_called"].tolist()
    [0, 1]
    """
    block = np.asarray(block)
    n_hom_ref = (block == 0).sum(axis=0)
    n_het = (block == 1).sum(axis=0)
    n_hom_var = (block == 2).sum(axis=0)
    return {
        "n_hom_ref": n_hom_ref,
        "n_het": n_het,
        "n_hom_var": n_hom_var,
        "n_not_called": (block == MISSING).sum(axis=0),
    }


def _hwe_log_probabilities(n: int, rare: int) -> tuple[np.ndarray, np.ndarray]:
    """log P(het = h | n genotypes, rare allele copies) for every feasible h, up to a constant."""
    het = np.arange(rare % 2, rare + 1, 2)
    hom_rare = (rare - het) // 2
    hom_common = n - het - hom_rare
    keep = hom_common >= 0
    het, hom_rare, hom_common = het[keep], hom_rare[keep], hom_common[keep]
    logp = het * math.log(2.0) - special.gammaln(het + 1) - special.gammaln(hom_rare + 1) - special.gammaln(hom_common + 1)
    return het, logp


def hardy_weinberg_p(n_het: int, n_hom_ref: int, n_hom_var: int) -> float:
    """Two-sided exact Hardy-Weinberg p-value (not mid-p), as ``plink2 --hardy``.

    Parameters
    ----------
    n_het, n_hom_ref, n_hom_var : int
        Genotype counts among called samples.

    Returns
    -------
    float
        The sum of the probabilities of all heterozygote counts no more likely
        than the observed one; ``nan`` when no sample is called.

    Examples
    --------
    >>> round(hardy_weinberg_p(0, 50, 50), 12) < 1e-20
    True
    >>> hardy_weinberg_p(0, 0, 0)
    nan
    """
    n_het, n_hom_ref, n_hom_var = int(n_het), int(n_hom_ref), int(n_hom_var)
    if min(n_het, n_hom_ref, n_hom_var) < 0:
        raise ValueError("n_het, n_hom_ref, n_hom_var: counts must be >= 0")
    n = n_het + n_hom_ref + n_hom_var
    if n == 0:
        return float("nan")
    rare = 2 * min(n_hom_ref, n_hom_var) + n_het
    het, logp = _hwe_log_probabilities(n, rare)
    logp = logp - logp.max()
    probs = np.exp(logp)
    observed = probs[np.searchsorted(het, n_het)]
    p = probs[probs <= observed * _TIE].sum() / probs.sum()
    return float(min(p, 1.0))


def hardy_weinberg(n_het, n_hom_ref, n_hom_var) -> np.ndarray:
    """:func:`hardy_weinberg_p` over arrays of counts (identical count triples computed once).

    Examples
    --------
    >>> hardy_weinberg([2, 1], [1, 2], [1, 1]).round(6).tolist()
    [1.0, 0.428571]
    """
    triples = np.stack([np.asarray(n_het), np.asarray(n_hom_ref), np.asarray(n_hom_var)], axis=1).astype(np.int64)
    unique, inverse = np.unique(triples, axis=0, return_inverse=True)
    values = np.array([hardy_weinberg_p(*t) for t in unique], dtype=float)
    return values[np.asarray(inverse).reshape(-1)] if len(triples) else np.empty(0)


def _check_design(block, y, covariates):
    block = np.asarray(block)
    y = np.asarray(y, dtype=float)
    n = block.shape[1]
    if y.shape != (n,):
        raise ValueError(f"y: must have one value per sample ({n}), got shape {y.shape}")
    c = np.ones((n, 1)) if covariates is None else np.column_stack([np.ones(n), np.asarray(covariates, dtype=float)])
    if c.shape[0] != n:
        raise ValueError(f"covariates: must have one row per sample ({n}), got {c.shape[0]}")
    keep = np.isfinite(y) & np.isfinite(c).all(axis=1)
    return block[:, keep], y[keep], c[keep]


def _dosages(block, missing):
    called = block != MISSING
    g = np.where(called, block, 0).astype(float)
    if missing == "mean":
        n_called = called.sum(axis=1)
        mean = np.divide(g.sum(axis=1), n_called, out=np.zeros(len(g)), where=n_called > 0)
        g = np.where(called, g, mean[:, None])
        called = np.ones_like(called) & (n_called > 0)[:, None]
    elif missing != "drop":
        raise ValueError(f"missing: must be 'drop' (PLINK 2) or 'mean' (Hail), got {missing!r}")
    return g, called.astype(float)


def _normal_system(g, m, c, w, z):
    """X'WX and X'Wz for every variant, X = [c, g]: (V, k, k) and (V, k), with weights w = m * w_i."""
    n, p = c.shape
    k = p + 1
    wm = m * w  # (V, n)
    cc = np.einsum("ni,nj->nij", c, c).reshape(n, p * p)
    xtx = np.empty((len(g), k, k))
    xtx[:, :p, :p] = (wm @ cc).reshape(-1, p, p)
    wg = wm * g
    cg = wg @ c
    xtx[:, :p, p] = cg
    xtx[:, p, :p] = cg
    xtx[:, p, p] = (wg * g).sum(axis=1)
    xtz = np.empty((len(g), k))
    xtz[:, :p] = (wm * z) @ c
    xtz[:, p] = (wg * z).sum(axis=1)
    return xtx, xtz


def _solve(xtx, xtz):
    """Batched solve with the inverse's last diagonal element; singular systems give NaN."""
    beta = np.full(xtz.shape, np.nan)
    inv_last = np.full(len(xtz), np.nan)
    cond = np.linalg.cond(xtx) if len(xtx) else np.empty(0)
    ok = np.isfinite(cond) & (cond < 1e12)
    if ok.any():
        inv = np.linalg.inv(xtx[ok])
        beta[ok] = np.einsum("vij,vj->vi", inv, xtz[ok])
        inv_last[ok] = inv[:, -1, -1]
    return beta, inv_last


def linear_association(block, y, covariates=None, *, missing="drop", chunk=2048) -> dict:
    """Ordinary least squares of ``y`` on [1, covariates, ALT dosage] for every variant.

    Parameters
    ----------
    block : numpy.ndarray of int8, shape (variants, samples)
    y : array-like of float, shape (samples,)
        Phenotype; samples with a missing (NaN) value or covariate are left out.
    covariates : array-like, shape (samples, c), optional
    missing : {"drop", "mean"}
        ``"drop"`` (PLINK 2): a sample with a missing call is left out for that
        variant; ``"mean"`` (Hail): the call is replaced by the variant's mean dosage.

    Returns
    -------
    dict of numpy.ndarray
        ``n`` (samples used), ``beta``, ``se``, ``t_stat``, ``p_value`` for the ALT
        dosage; NaN where the variant is constant or the fit is singular.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[0, 1, 2, 0, 1, 2]], dtype=np.int8)
    >>> r = linear_association(g, [1.0, 2.1, 2.9, 1.2, 2.0, 3.1])
    >>> round(float(r["beta"][0]), 4)
    0.95
    """
    block, y, c = _check_design(block, y, covariates)
    out = {key: np.full(len(block), np.nan) for key in ("n", "beta", "se", "t_stat", "p_value")}
    k = c.shape[1] + 1
    q, _ = np.linalg.qr(c)  # for variants called in every sample: the Frisch-Waugh-Lovell shortcut
    y_resid = y - q @ (q.T @ y)
    for start in range(0, len(block), chunk):
        part = slice(start, start + chunk)
        g, m = _dosages(block[part], missing)
        beta_g = np.full(len(g), np.nan)
        se = np.full(len(g), np.nan)
        n_used = m.sum(axis=1)
        complete = n_used == len(y)
        if complete.any():
            # Regressing y on [c, g] gives g's coefficient as (g_r . y_r) / (g_r . g_r), with g_r and y_r
            # the residuals of g and y on c; one matrix product for the whole chunk.
            gc = g[complete]
            g_resid = gc - (gc @ q) @ q.T
            gg = (g_resid * g_resid).sum(axis=1)
            gy = g_resid @ y_resid
            with np.errstate(invalid="ignore", divide="ignore"):
                b = np.where(gg > 1e-9 * np.maximum((gc * gc).sum(axis=1), 1), gy / gg, np.nan)
                rss = (y_resid @ y_resid) - b * gy
                s = np.sqrt(rss / (len(y) - k) / gg)
            beta_g[complete], se[complete] = b, np.where(np.isfinite(b), s, np.nan)
        partial = ~complete
        if partial.any():
            xtx, xty = _normal_system(g[partial], m[partial], c, np.ones_like(y), y)
            beta, inv_last = _solve(xtx, xty)
            rss = (m[partial] * y * y).sum(axis=1) - np.einsum("vi,vi->v", beta, xty)
            df = n_used[partial] - k
            with np.errstate(invalid="ignore", divide="ignore"):
                sigma2 = np.where(df > 0, rss / df, np.nan)
                se[partial] = np.sqrt(sigma2 * inv_last)
            beta_g[partial] = beta[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = beta_g / se
        df = np.maximum(n_used - k, 1)
        out["n"][part] = n_used
        out["beta"][part] = beta_g
        out["se"][part] = se
        out["t_stat"][part] = t
        out["p_value"][part] = np.where(np.isfinite(t), 2 * stats.t.sf(np.abs(t), df), np.nan)
    return out


def logistic_association(block, y, covariates=None, *, missing="drop", chunk=1024, max_iterations=25,
                         tolerance=1e-8) -> dict:
    """Wald test of a logistic regression of a 0/1 ``y`` on [1, covariates, ALT dosage] for every variant.

    Fitted by Newton-Raphson in double precision; a fit that does not
    converge, or separates the outcome, gives NaN (PLINK 2 would fall back to
    Firth regression there).

    Parameters
    ----------
    block, covariates, missing
        As :func:`linear_association`.
    y : array-like, shape (samples,)
        1 for a case, 0 for a control, NaN when unknown.

    Returns
    -------
    dict of numpy.ndarray
        ``n``, ``beta`` (log odds ratio per ALT allele), ``se``, ``z_stat``,
        ``p_value``, ``converged`` (bool).

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[0, 1, 2, 0, 1, 2, 0, 2]], dtype=np.int8)
    >>> r = logistic_association(g, [0, 1, 1, 0, 0, 1, 1, 0])
    >>> bool(r["converged"][0]), round(float(r["beta"][0]), 3)
    (True, 0.693)
    """
    block, y, c = _check_design(block, y, covariates)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y: a logistic model needs 0/1 values (or NaN for unknown)")
    out = {key: np.full(len(block), np.nan) for key in ("n", "beta", "se", "z_stat", "p_value")}
    out["converged"] = np.zeros(len(block), dtype=bool)
    k = c.shape[1] + 1
    for start in range(0, len(block), chunk):
        part = slice(start, start + chunk)
        g, m = _dosages(block[part], missing)
        v = len(g)
        beta = np.zeros((v, k))
        done = np.zeros(v, dtype=bool)
        # Complete separation by the genotype alone (every carrier a case, or every carrier a control):
        # the likelihood has no maximum, so there is nothing to iterate (PLINK 2 would use Firth here).
        carriers = m * (g > 0)
        failed = ((carriers * y).sum(axis=1) == 0) | ((carriers * (1 - y)).sum(axis=1) == 0)
        inv_last = np.full(v, np.nan)
        for _ in range(max_iterations):
            live = ~done & ~failed
            if not live.any():
                break
            gl, ml, bl = g[live], m[live], beta[live]
            eta = bl[:, :-1] @ c.T + bl[:, -1:] * gl
            mu = special.expit(eta)
            w = mu * (1 - mu)
            # Newton step: (X'WX) delta = X'(y - mu); weights are per variant, so fold them in per row.
            xtx, _ = _normal_system(gl, ml * w, c, np.ones_like(y), np.zeros_like(y))
            resid = ml * (y - mu)
            score = np.empty((len(gl), k))
            score[:, :-1] = resid @ c
            score[:, -1] = (resid * gl).sum(axis=1)
            delta, _ = _solve(xtx, score)
            bad = ~np.isfinite(delta).all(axis=1)
            idx = np.flatnonzero(live)
            failed[idx[bad]] = True
            step = np.where(bad[:, None], 0.0, delta)
            beta[idx] = bl + step
            converged_now = ~bad & (np.abs(step).max(axis=1) < tolerance * (1 + np.abs(beta[idx]).max(axis=1)))
            done[idx[converged_now]] = True
            failed[idx[~converged_now & (np.abs(beta[idx]).max(axis=1) > _DIVERGED)]] = True  # separation
        # standard errors from the information matrix at the estimate
        ok = done & ~failed & (np.abs(beta).max(axis=1) < _DIVERGED)
        if ok.any():
            eta = beta[ok, :-1] @ c.T + beta[ok, -1:] * g[ok]
            mu = special.expit(eta)
            xtx, _ = _normal_system(g[ok], m[ok] * mu * (1 - mu), c, np.ones_like(y), np.zeros_like(y))
            _, last = _solve(xtx, np.zeros((ok.sum(), k)))
            inv_last[ok] = last
        se = np.sqrt(inv_last)
        z = np.where(ok, beta[:, -1] / se, np.nan)
        out["n"][part] = m.sum(axis=1)
        out["beta"][part] = np.where(ok, beta[:, -1], np.nan)
        out["se"][part] = np.where(ok, se, np.nan)
        out["z_stat"][part] = z
        out["p_value"][part] = np.where(np.isfinite(z), 2 * stats.norm.sf(np.abs(z)), np.nan)
        out["converged"][part] = ok
    return out


def gram_block(block: np.ndarray, min_maf: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:
    """One shard's share of PLINK 2's relationship matrix.

    Parameters
    ----------
    block : numpy.ndarray of int8, shape (variants, samples)
    min_maf : float
        Variants whose minor allele frequency among called alleles is below
        this are left out. Monomorphic variants add nothing but count as
        called, as in ``plink2 --pca``.

    Returns
    -------
    gram : numpy.ndarray, shape (samples, samples)
        Sum over the variants used of z_i z_j, z = (dosage - 2p) / sqrt(2p(1-p)),
        0 where not called.
    both_called : numpy.ndarray, shape (samples, samples), or float
        Number of variants used where both samples are called (a single number
        when no call is missing).
    used : int
        Number of variants used.

    Examples
    --------
    >>> import numpy as np
    >>> gram, both, used = gram_block(np.array([[0, 1, 2], [1, 1, 1]], dtype=np.int8))
    >>> used, both
    (2, 2.0)
    """
    block = np.asarray(block)
    counts = genotype_counts(block)
    n_called = counts["n_called"]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts["ac"] / (2 * n_called)
    maf = np.minimum(p, 1 - p)
    use = (n_called > 0) & (maf >= min_maf)
    kept = block[use]
    p = p[use][:, None]
    sd = np.sqrt(2 * p * (1 - p))
    called = kept != MISSING
    # A monomorphic variant adds nothing to the sums but, as in PLINK 2, still counts as called.
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(called & (sd > 0), (kept - 2 * p) / sd, 0.0)
    if called.all():  # no missing call: every pair is called at every variant used
        both = float(len(kept))
    else:
        c = called.astype(float)
        both = c.T @ c
    return z.T @ z, both, int(use.sum())


def relationship_pca(gram: np.ndarray, both_called: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenvalues and eigenvectors of the relationship matrix ``gram / both_called``.

    Returns
    -------
    eigenvalues : numpy.ndarray, shape (k,)
        Largest first.
    eigenvectors : numpy.ndarray, shape (samples, k)
        Unit length, sign fixed so that the largest-magnitude entry is positive.

    Examples
    --------
    >>> import numpy as np
    >>> values, vectors = relationship_pca(np.array([[2.0, 1.0], [1.0, 2.0]]), np.ones((2, 2)), k=1)
    >>> values.round(6).tolist(), vectors.shape
    ([3.0], (2, 1))
    """
    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: must be between 1 and the number of samples ({n}), got {k!r}")
    from scipy.linalg import eigh

    with np.errstate(invalid="ignore", divide="ignore"):
        grm = np.where(np.asarray(both_called) > 0, gram / both_called, 0.0)
    values, vectors = eigh(grm, subset_by_index=[n - k, n - 1])  # only the top k
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    flip = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    return values, vectors * flip

"""Cohort exploration: filter the samples by region, sex and a phenotype term, with small counts masked.

Every number the widget shows is a count of individuals (or drawn from one), so each follows
:mod:`ngp_research.reports.masking`: a count of 0 < n < ``threshold`` is shown as ``"<5"``, and a
histogram is drawn only for a selection of at least ``threshold`` samples with a value, with each of
its edges round numbers (so no axis shows a person's exact minimum or maximum) and its bins merged
until none holds a small count (see :func:`histogram_bins`).
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
import pandas as pd
import ipywidgets as widgets

from ..reports.masking import DEFAULT_THRESHOLD, MASK_NOTE, mask_count, mask_group_counts

__all__ = ["CohortExplorer"]

ANY = "any"


def _check_threshold(threshold) -> int:
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold: must be a positive integer, got {threshold!r}")
    return threshold


def _nice_step(span: float, bins: int) -> float:
    """A round bin width (1, 2, 2.5 or 5 times a power of ten) near ``span / bins``."""
    raw = span / max(bins, 1)
    if not raw > 0 or not math.isfinite(raw):
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def histogram_bins(values, threshold: int = DEFAULT_THRESHOLD, max_bins: int = 20):
    """Round bin edges for ``values``, merged until no bin holds 0 < n < ``threshold`` values.

    There are about ``len(values) / (2 * threshold)`` bins at first (at least 1, at most
    ``max_bins``; one more where the round edges call for it), each a round width (1, 2, 2.5 or 5
    times a power of ten), the first starting at or below the smallest value and the last ending
    above the largest. Then each bin of fewer than ``threshold`` (but some) values is merged with
    its smaller neighbour until there is none: a histogram shows no small count, neither as a bar
    nor as the difference between the total and the other bars. (For fewer than ``threshold``
    values in all, no histogram should be drawn.)

    Returns
    -------
    edges : numpy.ndarray
        ``k + 1`` bin edges (round numbers; merged bins are wider).
    counts : numpy.ndarray of int
        The ``k`` counts: each 0 or at least ``threshold`` (given that many values).

    Examples
    --------
    >>> edges, counts = histogram_bins([181.0, 187.5, 190.2, 195.0, 199.9, 203.1, 204.4, 210.0, 212.3, 219.8])
    >>> edges.tolist(), counts.tolist()
    ([150.0, 200.0, 250.0], [5, 5])

    One value alone below 10 would be a bin of 1: it is merged into its neighbour.

    >>> edges, counts = histogram_bins([1.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0], threshold=2)
    >>> edges.tolist(), counts.tolist()
    ([0.0, 20.0], [8])
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.array([0.0, 1.0]), np.array([0])
    lo, hi = float(values.min()), float(values.max())
    bins = int(min(max_bins, max(1, values.size // (2 * threshold))))
    step = _nice_step(hi - lo if hi > lo else abs(lo) or 1.0, bins)
    start = math.floor(lo / step) * step
    stop = math.floor(hi / step) * step + step  # the largest value falls inside the last bin
    edges = start + step * np.arange(int(round((stop - start) / step)) + 1)
    edges = list(np.round(edges, 10))
    counts = list(np.histogram(values, bins=edges)[0])
    while len(counts) > 1:
        small = [i for i, c in enumerate(counts) if 0 < c < threshold]
        if not small:
            break
        i = small[0]
        left = counts[i - 1] if i > 0 else None
        right = counts[i + 1] if i + 1 < len(counts) else None
        j = i + 1 if left is None or (right is not None and right <= left) else i - 1
        a, b = min(i, j), max(i, j)
        counts[a:b + 1] = [counts[a] + counts[b]]
        del edges[b]  # the edge between the two
    return np.array(edges), np.array(counts, dtype=int)


class CohortExplorer(widgets.VBox):
    """Explore a cohort's samples: how many match a region, sex and phenotype term, small counts masked.

    Parameters
    ----------
    samples : pandas.DataFrame or ngp_research.cohort.Cohort
        The :attr:`Cohort.samples <ngp_research.cohort.Cohort.samples>` table (index: sample ID;
        columns ``region``, ``dataset``, ``sex``, float phenotypes, boolean phenotype terms), or a
        cohort (its ``samples`` are used).
    threshold : int
        Counts of 0 < n < ``threshold`` are shown as ``"<threshold"`` (default 5).
    quantity : str
        A numeric column whose histogram is drawn for the selection (default ``"cholesterol"``).

    Attributes
    ----------
    region : ipywidgets.SelectMultiple
        The regions included (all at first).
    sex : ipywidgets.Dropdown
        ``"any"`` or one of the values of the ``sex`` column.
    term : ipywidgets.Dropdown
        ``"any"`` or one of the boolean phenotype columns.
    presence : ipywidgets.ToggleButtons
        Whether ``term`` is ``present`` (True) or ``absent`` (False); disabled while ``term`` is "any".
    selection : pandas.DataFrame
        The samples that match now.
    count : int
        Their number (unmasked: it never leaves the kernel as such).
    count_text : str
        The number as shown (masked).
    region_counts : dict
        The masked count of each selected region.
    histogram_counts : list of str or None
        The masked count of each histogram bin, or None where no histogram is drawn.

    Examples
    --------
    >>> import pandas as pd
    >>> samples = pd.DataFrame({
    ...     "region": ["norr"] * 6 + ["syd"] * 3,
    ...     "sex": ["FEMALE", "MALE"] * 4 + ["FEMALE"],
    ...     "cholesterol": [182.0, 190.5, 201.2, 176.3, 210.9, 195.4, 188.8, 205.1, 199.0],
    ...     "hypertension": [True, False, True, True, False, False, True, False, True],
    ... }, index=[f"S{i}" for i in range(9)])
    >>> explorer = CohortExplorer(samples)
    >>> explorer.count, explorer.count_text, explorer.region_counts
    (9, '9', {'norr': 'suppressed', 'syd': '<5'})
    >>> explorer.term.value = "hypertension"
    >>> explorer.count, explorer.count_text, explorer.histogram_counts is None
    (5, '5', False)
    >>> explorer.region.value = ("syd",)
    >>> explorer.count_text, explorer.histogram_counts is None
    ('<5', True)
    """

    def __init__(self, samples, threshold: int = DEFAULT_THRESHOLD, quantity: str = "cholesterol"):
        super().__init__()
        if not isinstance(samples, pd.DataFrame) and isinstance(getattr(samples, "samples", None), pd.DataFrame):
            samples = samples.samples
        if not isinstance(samples, pd.DataFrame):
            raise TypeError(f"samples: a DataFrame (Cohort.samples) or a Cohort, got {type(samples).__name__}")
        if "region" not in samples.columns:
            raise ValueError("samples: no region column (expected Cohort.samples)")
        self.threshold = _check_threshold(threshold)
        numeric = [c for c in samples.columns
                   if pd.api.types.is_numeric_dtype(samples[c]) and not pd.api.types.is_bool_dtype(samples[c])]
        if quantity not in numeric:
            raise ValueError(f"quantity: {quantity!r} is not a numeric column of samples "
                             f"(numeric columns: {', '.join(map(str, numeric)) or 'none'})")
        self.samples = samples
        self.quantity = quantity
        self._regions = samples["region"].astype(str)
        self._sexes = samples["sex"].astype(str) if "sex" in samples.columns else None
        terms = [c for c in samples.columns if pd.api.types.is_bool_dtype(samples[c])]

        regions = sorted(self._regions.unique())
        self.region = widgets.SelectMultiple(options=regions, value=tuple(regions), description="Region",
                                             rows=max(1, min(len(regions), 8)))
        sexes = sorted(self._sexes.unique()) if self._sexes is not None else []
        self.sex = widgets.Dropdown(options=[ANY] + sexes, value=ANY, description="Sex", disabled=not sexes)
        self.term = widgets.Dropdown(options=[ANY] + terms, value=ANY, description="Phenotype",
                                     disabled=not terms)
        self.presence = widgets.ToggleButtons(options=[("present", True), ("absent", False)], value=True,
                                              disabled=True, style={"button_width": "6em"})
        self.count_html = widgets.HTML()
        self.regions_html = widgets.HTML()
        self.histogram = widgets.Output(layout={"min_height": "2em"})
        note = html.escape(MASK_NOTE.format(threshold=self.threshold))
        self.children = [
            widgets.HBox([self.region, widgets.VBox([self.sex, self.term, self.presence])]),
            self.count_html,
            widgets.HBox([self.regions_html, self.histogram]),
            widgets.HTML(f"<small>{note}</small>"),
        ]
        for control in (self.region, self.sex, self.term, self.presence):
            control.observe(self._update, names="value")
        self._update()

    # --- the selection --------------------------------------------------------------------

    def _matches(self) -> pd.Series:
        keep = self._regions.isin(self.region.value)
        if self.sex.value != ANY and self._sexes is not None:
            keep &= self._sexes == self.sex.value
        if self.term.value != ANY:
            keep &= self.samples[self.term.value].eq(bool(self.presence.value)).fillna(False).astype(bool)
        return keep

    def _update(self, change=None) -> None:
        self.presence.disabled = self.term.value == ANY
        self.selection = self.samples[self._matches().to_numpy()]
        self.count = int(len(self.selection))
        self.count_text = mask_count(self.count, self.threshold)
        what = [f"sex {self.sex.value}"] if self.sex.value != ANY else []
        if self.term.value != ANY:
            what.append(f"{self.term.value} {'present' if self.presence.value else 'absent'}")
        self.count_html.value = (f"<b style='font-size:1.4em'>{html.escape(self.count_text)}</b> matching samples"
                                 + (f" ({html.escape(', '.join(what))})" if what else ""))
        per_region = self.selection["region"].astype(str).value_counts()
        self.region_counts = mask_group_counts({r: int(per_region.get(r, 0)) for r in self.region.value},
                                               self.threshold)
        rows = "".join(f"<tr><td>{html.escape(r)}</td><td style='text-align:right'>{html.escape(c)}</td></tr>"
                       for r, c in self.region_counts.items())
        self.regions_html.value = ("<table><thead><tr><th>region</th><th>samples</th></tr></thead>"
                                   f"<tbody>{rows}</tbody></table>")
        self._draw_histogram()

    # --- the histogram --------------------------------------------------------------------

    def _message(self, text: str) -> dict:
        return {"output_type": "display_data", "metadata": {},
                "data": {"text/plain": text, "text/html": f"<i>{html.escape(text)}</i>"}}

    def _draw_histogram(self) -> None:
        values = pd.to_numeric(self.selection[self.quantity], errors="coerce").dropna().to_numpy(dtype=float)
        n = values.size
        self.histogram_counts = None
        if n == 0:
            self.histogram.outputs = (self._message(f"No {self.quantity} values in this selection."),)
            return
        if n < self.threshold:
            self.histogram.outputs = (self._message(
                f"Histogram of {self.quantity} masked: fewer than {self.threshold} samples in this selection "
                "have a value."),)
            return
        edges, counts = histogram_bins(values, self.threshold)
        texts = [mask_count(c, self.threshold) for c in counts]
        self.histogram_counts = texts
        self.histogram.outputs = ({"output_type": "display_data", "metadata": {},
                                   "data": {"image/png": self._png(edges, counts),
                                            "text/plain": f"<histogram of {self.quantity}: {texts}>"}},)

    def _png(self, edges, counts) -> str:
        from matplotlib.figure import Figure  # no pyplot: no global figures, no backend to choose

        widths = np.diff(edges)
        fig = Figure(figsize=(4.5, 2.8), dpi=80)
        ax = fig.add_subplot()
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4c72b0", edgecolor="white")
        ax.set_xticks(edges)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(self.quantity)
        ax.set_ylabel("samples")
        ax.set_title(f"{self.quantity}: {mask_count(int(counts.sum()), self.threshold)} samples", fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

"""Variant review: the candidate variants per carrier as a table a reviewer filters, sorts and marks.

Each mark is one JSON line appended to a store in the project (default
``/project/reviews/variant-review.jsonl``)::

    {"sample": ..., "variant_id": ..., "gene": ..., "reviewer": ..., "comment": ..., "at": "<UTC ISO time>",
     "status": "reviewed"}

The file is opened in append mode and synced to disk before the mark is shown, so several reviewers
(or kernels) can share it. Before it is written, the audit event ``ngp.review.mark`` (store path,
the record) is raised: the audited kernel records it as a ``review.mark`` record attributed to the
running cell, and if the record cannot be taken the mark is refused.
"""

from __future__ import annotations

import getpass
import html
import json
import os
import sys
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import ipywidgets as widgets

__all__ = ["DEFAULT_STORE", "VariantReview", "load_reviews", "append_review"]

DEFAULT_STORE = "/project/reviews/variant-review.jsonl"
ALL = "all genes"
REQUIRED = ("sample", "variant_id", "gene", "af")
MAX_ROWS = 500  # rows rendered in the table (and offered for selection); the filters narrow it down

_audit = sys.audit  # bound now, as in ngp_research.kernel.entrypoints


def _default_reviewer() -> str:
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def load_reviews(store) -> tuple[dict, int]:
    """The latest record of each (sample, variant_id) in a review store, and how many lines were unreadable.

    Examples
    --------
    >>> import os, tempfile
    >>> store = os.path.join(tempfile.mkdtemp(), "reviews.jsonl")
    >>> load_reviews(store)
    ({}, 0)
    >>> with open(store, "w") as f:
    ...     _ = f.write('{"sample": "S1", "variant_id": "1:100:A:G", "status": "reviewed"}\\n{oops\\n')
    >>> load_reviews(store)
    ({('S1', '1:100:A:G'): {'sample': 'S1', 'variant_id': '1:100:A:G', 'status': 'reviewed'}}, 1)
    """
    reviews, unreadable = {}, 0
    try:
        handle = open(store, encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # nothing stored yet
        return reviews, 0
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                unreadable += 1
                continue
            if not isinstance(record, dict) or "sample" not in record or "variant_id" not in record:
                unreadable += 1
                continue
            reviews[(str(record["sample"]), str(record["variant_id"]))] = record
    return reviews, unreadable


def append_review(store, record: dict) -> None:
    """Append ``record`` as one JSON line to ``store`` (parent folders created) and sync it to disk.

    The audit event ``ngp.review.mark`` is raised first (with the store's path and a copy of the
    record): where the audited kernel cannot record it, nothing is written.
    """
    store = os.path.abspath(os.fspath(store))
    _audit("ngp.review.mark", store, dict(record))
    parent = os.path.dirname(store)
    os.makedirs(parent, exist_ok=True)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    created = not os.path.exists(store)
    fd = os.open(store, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:  # one write in practice: an O_APPEND write of a line lands whole at the end
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # the new file's directory entry, too
        try:
            dir_fd = os.open(parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


class VariantReview(widgets.VBox):
    """Review candidate variants: filter by gene and frequency, sort, mark (sample, variant) pairs reviewed.

    Parameters
    ----------
    candidates : pandas.DataFrame
        As returned by :meth:`Cohort.clinical_variants <ngp_research.cohort.Cohort.clinical_variants>`
        (``sample``, ``region``, ``dataset``, ``contig``, ``position``, ``variant_id``, ``ref``,
        ``alt``, ``gene``, ``consequence``, ``clinical_significance``, ``genotype``, ``alt_dosage``,
        ``af``, ``af_region``); at least ``sample``, ``variant_id``, ``gene`` and ``af``.
    store : str or os.PathLike
        The JSON-lines file of reviews (read now, appended to by each mark).
    reviewer : str, optional
        Who marks; default ``$USER``.

    Attributes
    ----------
    gene : ipywidgets.Dropdown
        ``"all genes"`` or one gene.
    max_af : ipywidgets.FloatSlider
        Rows with a cohort ``af`` above it are hidden.
    hide_reviewed : ipywidgets.Checkbox
    sort_by : ipywidgets.Dropdown
        The column the table is sorted by; ``ascending`` (a Checkbox) its direction.
    row : ipywidgets.Dropdown
        The (sample, variant_id) to mark, among the rows shown.
    comment : ipywidgets.Textarea
    mark_button : ipywidgets.Button
        "Mark reviewed": :meth:`mark_reviewed` on the selected row with the comment.
    view : pandas.DataFrame
        The rows shown, in order, with the columns ``reviewed``, ``reviewed_by``, ``reviewed_at``
        and ``review_comment`` added.
    reviews : dict
        The latest stored record of each (sample, variant_id).

    Examples
    --------
    >>> import os, tempfile
    >>> import pandas as pd
    >>> candidates = pd.DataFrame({
    ...     "sample": ["S1", "S2", "S2"], "variant_id": ["1:100:A:G", "1:100:A:G", "2:500:C:T"],
    ...     "gene": ["MYH7", "MYH7", "MYBPC3"], "af": [0.004, 0.004, 0.0012]})
    >>> store = os.path.join(tempfile.mkdtemp(), "reviews", "variant-review.jsonl")
    >>> review = VariantReview(candidates, store=store, reviewer="clara")
    >>> review.gene.value = "MYH7"
    >>> review.view["sample"].tolist()
    ['S1', 'S2']
    >>> review.row.value = ("S2", "1:100:A:G")
    >>> review.comment.value = "Likely pathogenic; confirm by Sanger."
    >>> review.mark_button.click()
    >>> review.view[["sample", "reviewed", "reviewed_by"]].to_dict("records")
    [{'sample': 'S1', 'reviewed': False, 'reviewed_by': ''}, {'sample': 'S2', 'reviewed': True, 'reviewed_by': 'clara'}]
    >>> VariantReview(candidates, store=store).view["reviewed"].tolist()
    [False, True, False]
    """

    def __init__(self, candidates: pd.DataFrame, store=DEFAULT_STORE, reviewer: str | None = None):
        super().__init__()
        if not isinstance(candidates, pd.DataFrame):
            raise TypeError(f"candidates: a DataFrame (Cohort.clinical_variants), got {type(candidates).__name__}")
        missing = [c for c in REQUIRED if c not in candidates.columns]
        if missing:
            raise ValueError(f"candidates: missing column(s) {', '.join(missing)} (expected Cohort.clinical_variants)")
        self.candidates = candidates.reset_index(drop=True)
        self._keys = list(zip(self.candidates["sample"].astype(str), self.candidates["variant_id"].astype(str)))
        self._af = pd.to_numeric(self.candidates["af"], errors="coerce").to_numpy(dtype=float)
        self.store = os.fspath(store)
        self.reviewer = reviewer or _default_reviewer()
        self.reviews, self.unreadable = load_reviews(self.store)

        genes = sorted(self.candidates["gene"].dropna().astype(str).unique())
        self.gene = widgets.Dropdown(options=[ALL] + genes, value=ALL, description="Gene")
        finite = self._af[np.isfinite(self._af)]
        top = float(finite.max()) if finite.size else 1.0
        top = top if top > 0 else 1.0
        self.max_af = widgets.FloatSlider(value=top, min=0.0, max=top, step=top / 200, description="Max AF",
                                          readout_format=".3g", continuous_update=False)
        self.hide_reviewed = widgets.Checkbox(value=False, description="Hide reviewed", indent=False)
        columns = [str(c) for c in self.candidates.columns] + ["reviewed"]
        self.sort_by = widgets.Dropdown(options=columns, value="sample", description="Sort by")
        self.ascending = widgets.Checkbox(value=True, description="Ascending", indent=False)
        self.table = widgets.HTML(layout={"max_height": "24em", "overflow": "auto"})
        self.row = widgets.Dropdown(options=[], description="Row", layout={"width": "32em"})
        self.comment = widgets.Textarea(placeholder="Comment (kept with the review)", description="Comment",
                                        layout={"width": "32em"})
        self.mark_button = widgets.Button(description="Mark reviewed", button_style="success", icon="check")
        self.status = widgets.HTML()
        self.children = [
            widgets.HBox([self.gene, self.max_af, self.hide_reviewed]),
            widgets.HBox([self.sort_by, self.ascending]),
            self.table,
            self.row,
            widgets.HBox([self.comment, self.mark_button]),
            self.status,
        ]
        for control in (self.gene, self.max_af, self.hide_reviewed, self.sort_by, self.ascending):
            control.observe(self._render, names="value")
        self.mark_button.on_click(self._on_mark)
        self._render()
        if self.unreadable:
            self._say(f"{self.unreadable} line(s) of {self.store} could not be read and were skipped.", error=True)

    # --- the table ------------------------------------------------------------------------

    def _with_reviews(self) -> pd.DataFrame:
        table = self.candidates.copy()
        found = [self.reviews.get(k) for k in self._keys]
        table["reviewed"] = [bool(r) and r.get("status") == "reviewed" for r in found]
        table["reviewed_by"] = [str(r.get("reviewer", "")) if r else "" for r in found]
        table["reviewed_at"] = [str(r.get("at", "")) if r else "" for r in found]
        table["review_comment"] = [str(r.get("comment", "")) if r else "" for r in found]
        return table

    def _render(self, change=None) -> None:
        table = self._with_reviews()
        keep = np.ones(len(table), dtype=bool)
        if self.gene.value != ALL:
            keep &= (table["gene"].astype(str) == self.gene.value).to_numpy()
        keep &= ~(self._af > self.max_af.value * (1 + 1e-9))  # a missing af is not filtered out
        if self.hide_reviewed.value:
            keep &= ~table["reviewed"].to_numpy()
        view = table[keep]
        try:
            view = view.sort_values(self.sort_by.value, ascending=self.ascending.value, kind="stable",
                                    na_position="last")
        except TypeError:  # mixed types in one column: sort by their text
            view = view.sort_values(self.sort_by.value, ascending=self.ascending.value, kind="stable",
                                    na_position="last", key=lambda s: s.astype(str))
        self.view = view.reset_index(drop=True)
        shown = self.view.head(MAX_ROWS)

        options = [(f"{i}: {s} · {v} ({g})", (str(s), str(v)))
                   for i, (s, v, g) in enumerate(zip(shown["sample"], shown["variant_id"], shown["gene"]))]
        previous = self.row.value
        self.row.options = options
        values = [value for _, value in options]
        self.row.value = previous if previous in values else (values[0] if values else None)
        self.row.disabled = self.mark_button.disabled = not values

        display = shown.drop(columns=["reviewed_at"]).copy()
        display["reviewed"] = ["✔" if r else "" for r in display["reviewed"]]
        display.insert(0, "#", range(len(display)))
        body = display.to_html(index=False, escape=True, border=0, na_rep="", classes="ngp-variant-review")
        more = (f"<p><small>Showing the first {MAX_ROWS} of {len(self.view)} rows; narrow the filters to see "
                "the rest.</small></p>") if len(self.view) > MAX_ROWS else ""
        counts = f"<p><small>{len(self.view)} of {len(table)} rows; {int(table['reviewed'].sum())} reviewed.</small></p>"
        self.table.value = counts + body + more

    # --- marking --------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    def _on_mark(self, button=None) -> None:
        try:
            record = self.mark_reviewed()
        except Exception as e:  # a button's exception would only reach the kernel log: show it here
            self._say(f"Not marked: {type(e).__name__}: {e}", error=True)
            return
        self._say(f"Marked {record['sample']} · {record['variant_id']} reviewed ({record['at']}).")

    def mark_reviewed(self, sample=None, variant_id=None, comment: str | None = None) -> dict:
        """Append a "reviewed" record for (sample, variant_id) to the store and show it; returns the record.

        Without arguments: the selected :attr:`row` and the text of :attr:`comment` (cleared once
        stored). Raises :class:`ValueError` for a pair that is not a candidate, or none selected.
        """
        if sample is None and variant_id is None:
            if self.row.value is None:
                raise ValueError("select a row first")
            sample, variant_id = self.row.value
        key = (str(sample), str(variant_id))
        try:
            index = self._keys.index(key)
        except ValueError:
            raise ValueError(f"{key[0]} · {key[1]} is not among the candidates") from None
        typed = comment is None
        text = self.comment.value if typed else comment
        record = {"sample": key[0], "variant_id": key[1], "gene": str(self.candidates["gene"].iloc[index]),
                  "reviewer": self.reviewer, "comment": str(text),
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "reviewed"}
        append_review(self.store, record)
        self.reviews[key] = record
        if typed:
            self.comment.value = ""
        self._render()
        return record

    def reload(self) -> None:
        """Read the store again (marks by other reviewers since) and redraw the table."""
        self.reviews, self.unreadable = load_reviews(self.store)
        self._render()

"""Small-count masking for aggregates shown in reports and widgets.

A count of fewer than ``threshold`` individuals (default 5) could identify them, so no table or plot
of aggregates shows one: the count becomes ``"<5"`` and every other aggregate of that group (a
mean, a frequency, ...) is blanked, since it was computed from the same few people. Zero is shown:
it describes nobody.

When exactly one group of a table is small, its count could be worked out from a total and the
other groups, so the next-smallest group is suppressed too (secondary suppression): its count is
shown as ``"suppressed"`` and its aggregates masked.

Examples
--------
>>> import pandas as pd
>>> table = pd.DataFrame({"region": ["norr", "mitt", "syd"], "samples": [12, 9, 3],
...                       "mean_cholesterol": [190.2, 188.0, 201.7]})
>>> for row in mask_small_groups(table, "samples").to_dict("records"):
...     print(row)
{'region': 'norr', 'samples': '12', 'mean_cholesterol': '190.2'}
{'region': 'mitt', 'samples': 'suppressed', 'mean_cholesterol': 'masked'}
{'region': 'syd', 'samples': '<5', 'mean_cholesterol': 'masked'}
"""

from __future__ import annotations

import pandas as pd

__all__ = ["DEFAULT_THRESHOLD", "MASK_NOTE", "SUPPRESSED", "mask_count", "mask_group_counts", "mask_small_groups",
           "mask_counts", "mask_table"]

SUPPRESSED = "suppressed"

DEFAULT_THRESHOLD = 5
MASK_NOTE = ("Counts of fewer than {threshold} individuals are shown as \"<{threshold}\" and the other aggregates "
             "of such a group are masked, so that no small group can be identified; where only one group is small, "
             "the next smallest is suppressed too, so that it cannot be worked out from a total.")


def _check(threshold) -> int:
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold: must be a positive integer, got {threshold!r}")
    return threshold


def mask_count(value, threshold: int = DEFAULT_THRESHOLD) -> str:
    """One count as text: ``"<threshold"`` when 0 < value < threshold.

    >>> mask_count(3), mask_count(0), mask_count(7)
    ('<5', '0', '7')
    """
    _check(threshold)
    value = int(value)
    return f"<{threshold}" if 0 < value < threshold else str(value)


def _small(counts, threshold: int) -> tuple[list[bool], list[bool]]:
    """Which groups are masked (small) and which are suppressed to protect a lone small group."""
    counts = [int(c) for c in counts]
    small = [0 < c < threshold for c in counts]
    secondary = [False] * len(counts)
    if sum(small) == 1 and len(counts) > 1:
        others = [(c, i) for i, c in enumerate(counts) if not small[i] and c > 0]
        if others:
            secondary[min(others)[1]] = True
    return small, secondary


def mask_group_counts(counts: dict, threshold: int = DEFAULT_THRESHOLD) -> dict:
    """Group name -> count as text, with small groups masked and a lone small group protected.

    >>> mask_group_counts({"norr": 12, "mitt": 9, "syd": 3})
    {'norr': '12', 'mitt': 'suppressed', 'syd': '<5'}
    >>> mask_group_counts({"norr": 12, "mitt": 9, "syd": 0})
    {'norr': '12', 'mitt': '9', 'syd': '0'}
    """
    _check(threshold)
    names = list(counts)
    small, secondary = _small([counts[n] for n in names], threshold)
    return {n: SUPPRESSED if sec else mask_count(counts[n], threshold) for n, sec in zip(names, secondary)}


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mask_small_groups(table: pd.DataFrame, count_column: str, threshold: int = DEFAULT_THRESHOLD,
                      keep=()) -> pd.DataFrame:
    """A copy of ``table`` (one row per group) as text, with small groups masked.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per group; ``count_column`` holds the group's number of individuals.
    count_column : str
    threshold : int
    keep : sequence of str
        Columns that describe the group rather than aggregate it (kept as they are). Columns of
        text (object dtype) are kept too.
    """
    _check(threshold)
    if count_column not in table.columns:
        raise ValueError(f"count_column: {count_column!r} is not a column")
    out = table.copy().astype(object)
    small, secondary = _small(table[count_column].tolist(), threshold)
    hidden = [a or b for a, b in zip(small, secondary)]
    for name in table.columns:
        if name == count_column:
            out[name] = [SUPPRESSED if sec else mask_count(v, threshold) for v, sec in zip(table[name], secondary)]
        elif name in keep or table[name].dtype == object:
            continue
        else:
            out[name] = ["masked" if h else _text(v) for v, h in zip(table[name], hidden)]
    return out


def mask_counts(table: pd.DataFrame, columns, threshold: int = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """A copy of ``table`` with each of ``columns`` (counts of individuals) masked cell by cell.

    >>> import pandas as pd
    >>> mask_counts(pd.DataFrame({"gene": ["A"], "carriers": [2], "non_carriers": [40]}),
    ...             ["carriers", "non_carriers"]).to_dict("records")
    [{'gene': 'A', 'carriers': '<5', 'non_carriers': '40'}]
    """
    _check(threshold)
    out = table.copy()
    for name in columns:
        out[name] = [mask_count(v, threshold) for v in table[name]]
    return out


def mask_table(table: pd.DataFrame, total: str, threshold: int = DEFAULT_THRESHOLD, parts=(), keep=(),
               formats=None) -> pd.DataFrame:
    """``table`` (one row per group) as text, masked for display: groups, then their parts.

    ``total`` counts each group's individuals: small groups are masked and a lone small group is
    protected by suppressing the next smallest (:func:`mask_small_groups`). ``parts`` are counts
    that add up to the total (e.g. per sex); in each group still shown they are masked the same way
    (:func:`mask_group_counts`), so that no small count can be worked out by subtraction.
    ``formats``: column -> format of its shown values (e.g. ``"{:.4f}"``).

    >>> import pandas as pd
    >>> table = pd.DataFrame({"region": ["norr", "syd"], "n": [20, 12], "female": [18, 9], "male": [2, 3],
    ...                       "af": [0.12345, 0.5]})
    >>> for row in mask_table(table, "n", parts=["female", "male"], keep=["region"],
    ...                       formats={"af": "{:.2f}"}).to_dict("records"):
    ...     print(row)
    {'region': 'norr', 'n': '20', 'female': 'suppressed', 'male': '<5', 'af': '0.12'}
    {'region': 'syd', 'n': '12', 'female': 'suppressed', 'male': '<5', 'af': '0.50'}
    """
    import numpy as np  # noqa: PLC0415

    out = mask_small_groups(table, total, threshold, keep=keep)
    shown = ~out[total].isin([mask_count(1, threshold), SUPPRESSED]).to_numpy()
    for name, spec in (formats or {}).items():  # numbers of the groups shown, in a fixed format
        out.loc[shown, name] = [spec.format(v) for v in table.loc[shown, name]]
    for i in np.flatnonzero(shown):
        masked = mask_group_counts({p: int(table[p].iloc[i]) for p in parts}, threshold)
        for p, text in masked.items():
            out.iloc[i, out.columns.get_loc(p)] = text
    return out

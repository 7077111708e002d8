"""Which names may become folder names in a region's or a project's area.

Region, dataset, project, user and file names all end up as path components
(``/data/<region>/<dataset>/<file>``), so each must be one plain component:
no separators, no ``..``, no leading dot or dash, no control characters.
"""

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(value, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise ValueError naming ``what``.

    >>> check_name("uppsala-cohort.vcf.gz", "file name")
    'uppsala-cohort.vcf.gz'
    >>> check_name("../etc", "dataset name")
    Traceback (most recent call last):
    ...
    ValueError: dataset name '../etc' is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value

"""Where a benchmark's numbers go: printed by the benchmark, and as JSON when ``--out`` names a file."""

import json
from pathlib import Path


def save(out: Path | None, result: dict) -> dict:
    """Write ``result`` as JSON to ``out`` (if given) and return it."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result

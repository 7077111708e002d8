"""``python -m ngp_research.reports.execute SPEC``: run one report inside the workspace sandbox.

Started by the runner (:mod:`ngp_research.reports.runner`) from a cell of the member's audited
kernel, so it runs as the member, sees only the project's tagged data, and papermill's kernel is
the audited ``ngp-python`` one: every cell of the report is recorded before it runs. ``SPEC`` is a
JSON file in the run folder: ``{"template", "parameters", "kernel", "provenance"}``.

It writes, in the run folder: ``report.ipynb`` (executed), ``report.html`` (the clinician's view:
code hidden, the provenance in a footer) and prints one JSON line with the outputs' sha256.
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
from pathlib import Path

__all__ = ["footer_html", "main"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def footer_html(provenance: dict) -> str:
    """The provenance footer of a rendered report.

    >>> "abc123" in footer_html({"run": "r", "template": "t", "template_sha256": "abc123", "parameters": {},
    ...                          "inputs": [], "user": "u", "project": "p", "report_sha256": "f"})
    True
    """
    inputs = "".join(
        f"<li>{html.escape(d['region'])}/{html.escape(d['dataset'])}: "
        + ", ".join(f"{html.escape(f['name'])} <code>{html.escape(str(f.get('sha256', ''))[:16])}</code>"
                    for f in d.get("files", []))
        + "</li>"
        for d in provenance.get("inputs", []))
    params = html.escape(json.dumps(provenance.get("parameters", {}), sort_keys=True))
    return (
        '<footer id="ngp-provenance" style="margin-top:3em;border-top:1px solid #999;font-size:85%;color:#333">'
        "<h3>Provenance</h3><dl>"
        f"<dt>Run</dt><dd>{html.escape(provenance['run'])}</dd>"
        f"<dt>Template</dt><dd>{html.escape(provenance['template'])} "
        f"<code>sha256 {html.escape(provenance['template_sha256'])}</code></dd>"
        f"<dt>Parameters</dt><dd><code>{params}</code></dd>"
        f"<dt>Input datasets</dt><dd><ul>{inputs}</ul></dd>"
        f"<dt>Run by</dt><dd>{html.escape(provenance['user'])} in project {html.escape(provenance['project'])}</dd>"
        f"<dt>Executed notebook</dt><dd><code>sha256 {html.escape(provenance['report_sha256'])}</code></dd>"
        "</dl></footer>")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    run_dir = spec_path.parent
    import papermill
    from nbconvert import HTMLExporter

    notebook = run_dir / "report.ipynb"
    error = None
    try:
        papermill.execute_notebook(str(run_dir / spec["template"]), str(notebook), parameters=spec["parameters"],
                                   kernel_name=spec.get("kernel", "ngp-python"), cwd=str(run_dir),
                                   progress_bar={"file": sys.stdout, "ascii": True, "mininterval": 1.0},
                                   request_save_on_cell_execute=True)
    except papermill.PapermillExecutionError as e:
        error = f"cell {e.exec_count} raised {e.ename}: {e.evalue}"
    except Exception as e:  # the kernel could not start, the audit service refused, ...
        error = f"{type(e).__name__}: {e}"
    outputs = {}
    if notebook.exists():
        provenance = dict(spec["provenance"], report_sha256=_sha256(notebook))
        exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
        body, _ = exporter.from_filename(str(notebook))
        body = body.replace("</body>", footer_html(provenance) + "\n</body>", 1)
        (run_dir / "report.html").write_text(body, encoding="utf-8")
        outputs = {"report.ipynb": provenance["report_sha256"], "report.html": _sha256(run_dir / "report.html")}
    print(json.dumps({"ngp_report": {"outputs": outputs, "error": error}}), flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())

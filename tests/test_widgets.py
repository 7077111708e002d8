"""The notebook widgets: CohortExplorer driven in a real kernel as a browser drives it, VariantReview in process.

The explorer runs in an ipykernel of this environment started by jupyter_client; its controls are
changed the way the browser's widget manager does (a ``comm_msg`` ``update`` with the new state,
protocol 2.1.0), and the kernel's answers (the updated count widget) are read off iopub.
"""

import json
import os
import sys
import textwrap
from datetime import datetime, timezone

import pandas as pd
import pytest

from ngp_research.widgets import VariantReview, load_reviews

# --- CohortExplorer in a kernel -----------------------------------------------------------------

SETUP = """
import json
import pandas as pd
from IPython.display import display
from ngp_research.widgets import CohortExplorer

regions = ["norr"] * 12 + ["mitt"] * 9 + ["syd"] * 3
samples = pd.DataFrame({
    "region": regions,
    "dataset": [r + "-cohort" for r in regions],
    "sex": ["FEMALE", "MALE"] * 12,
    "cholesterol": [170.0 + 2.5 * i for i in range(24)],
    "hypertension": [i % 3 == 0 for i in range(24)],
}, index=[f"S{i:02d}" for i in range(24)])
explorer = CohortExplorer(samples)
display(explorer)
print(json.dumps({"explorer": explorer.model_id, "region": explorer.region.model_id,
                  "sex": explorer.sex.model_id, "term": explorer.term.model_id,
                  "count_html": explorer.count_html.model_id, "histogram": explorer.histogram.model_id,
                  "regions": list(explorer.region.options), "sexes": list(explorer.sex.options),
                  "terms": list(explorer.term.options)}))
"""

STATE = """
print(json.dumps({"count": explorer.count, "count_text": explorer.count_text,
                  "region_counts": explorer.region_counts, "histogram_counts": explorer.histogram_counts,
                  "png": any("image/png" in o.get("data", {}) for o in explorer.histogram.outputs),
                  "histogram_text": " ".join(o.get("data", {}).get("text/plain", "")
                                             for o in explorer.histogram.outputs)}))
"""


class Kernel:
    def __init__(self, cwd):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3", connection_file=str(cwd / "kernel.json"))
        self.km.start_kernel(cwd=str(cwd))
        self.client = self.km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code):
        """Execute ``code``; its stdout and the display_data messages it sent."""
        out, displays, errors = [], [], []

        def hook(msg):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "display_data":
                displays.append(content)
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))

        reply = self.client.execute_interactive(textwrap.dedent(code), timeout=60, output_hook=hook)
        assert reply["content"]["status"] == "ok" and not errors, "\n".join(errors) or reply["content"]
        return "".join(out), displays

    def state(self):
        return json.loads(self.run(STATE)[0])

    def update(self, model_id, state):
        """Send what a browser sends when a control changes; the kernel's iopub messages in answer."""
        msg = self.client.session.msg("comm_msg", {
            "comm_id": model_id, "data": {"method": "update", "state": state, "buffer_paths": []}})
        self.client.shell_channel.send(msg)
        answers = []
        while True:
            m = self.client.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            answers.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return answers

    def close(self):
        self.client.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    k = Kernel(tmp_path_factory.mktemp("kernel"))
    try:
        yield k
    finally:
        k.close()


def _updates_of(answers, model_id):
    """The state updates the kernel sent to the browser for one widget."""
    return [m["content"]["data"]["state"] for m in answers
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
            and m["content"]["data"].get("method") == "update"]


def test_cohort_explorer_in_a_kernel(kernel):
    out, displays = kernel.run(SETUP)
    ids = json.loads(out)
    views = [d["data"]["application/vnd.jupyter.widget-view+json"] for d in displays
             if "application/vnd.jupyter.widget-view+json" in d["data"]]
    assert [v["model_id"] for v in views] == [ids["explorer"]]  # display() renders the whole box
    assert ids["regions"] == ["mitt", "norr", "syd"]
    assert ids["sexes"] == ["any", "FEMALE", "MALE"]
    assert ids["terms"] == ["any", "hypertension"]

    start = kernel.state()
    assert start["count"] == 24 and start["count_text"] == "24"
    # syd's 3 are masked, and mitt (the next smallest) is suppressed: 24 - 12 - 9 would give syd away
    assert start["region_counts"] == {"mitt": "suppressed", "norr": "12", "syd": "<5"}
    assert start["png"] and start["histogram_counts"]
    assert all(c == "0" or int(c) >= 5 for c in start["histogram_counts"])  # no small bin is ever drawn

    # Sex: FEMALE (a Dropdown syncs its index, as the browser sends it).
    answers = kernel.update(ids["sex"], {"index": ids["sexes"].index("FEMALE")})
    assert any("12" in s.get("value", "") for s in _updates_of(answers, ids["count_html"]))
    now = kernel.state()
    assert now["count"] == 12 and now["count_text"] == "12"
    assert now["region_counts"] == {"mitt": "suppressed", "norr": "6", "syd": "<5"}

    # Back to any sex, then only syd (3 samples): masked, and no histogram.
    kernel.update(ids["sex"], {"index": 0})
    answers = kernel.update(ids["region"], {"index": [ids["regions"].index("syd")]})
    shown = [s["value"] for s in _updates_of(answers, ids["count_html"]) if "value" in s]
    assert shown and "&lt;5" in shown[-1] and ">3<" not in shown[-1]
    sent_outputs = [s["outputs"] for s in _updates_of(answers, ids["histogram"]) if "outputs" in s]
    assert sent_outputs and not any("image/png" in o["data"] for o in sent_outputs[-1])
    now = kernel.state()
    assert now["count"] == 3 and now["count_text"] == "<5"
    assert now["region_counts"] == {"syd": "<5"}
    assert now["histogram_counts"] is None and not now["png"] and "masked" in now["histogram_text"]

    # A phenotype term on the whole cohort: hypertension present (every third sample), then absent.
    kernel.update(ids["region"], {"index": [0, 1, 2]})
    kernel.update(ids["term"], {"index": ids["terms"].index("hypertension")})
    assert kernel.state()["count"] == 8
    out, _ = kernel.run("explorer.presence.value = False; print(explorer.count, explorer.presence.disabled)")
    assert out.split() == ["16", "False"]


# --- VariantReview, in process --------------------------------------------------------------------

_MARKS = []  # ("ngp.review.mark", args) seen by the hook below; hooks cannot be removed, so it only appends
_HOOKED = []


def _review_marks():
    if not _HOOKED:
        def collect(event, args):
            if event == "ngp.review.mark":
                _MARKS.append(args)

        sys.addaudithook(collect)
        _HOOKED.append(collect)
    return _MARKS


def _candidates():
    rows = [
        ("S01", "norr", "1", 1000, "MYH7", "missense_variant", "Pathogenic", 1, 0.004, 0.006),
        ("S01", "norr", "2", 5000, "MYBPC3", "stop_gained", "Pathogenic", 1, 0.0012, 0.002),
        ("S02", "syd", "1", 1000, "MYH7", "missense_variant", "Pathogenic", 2, 0.004, 0.003),
        ("S03", "mitt", "1", 1200, "MYH7", "frameshift_variant", "Likely_pathogenic", 1, 0.0008, 0.001),
        ("S04", "syd", "2", 5300, "MYBPC3", "splice_donor_variant", "Pathogenic", 1, 0.009, 0.01),
    ]
    table = pd.DataFrame(rows, columns=["sample", "region", "contig", "position", "gene", "consequence",
                                        "clinical_significance", "alt_dosage", "af", "af_region"])
    table.insert(2, "dataset", table["region"] + "-cohort")
    table["ref"], table["alt"] = "A", "G"
    table["variant_id"] = table["contig"] + ":" + table["position"].astype(str) + ":A:G"
    table["genotype"] = ["hom_alt" if d == 2 else "het" for d in table["alt_dosage"]]
    return table[["sample", "region", "dataset", "contig", "position", "variant_id", "ref", "alt", "gene",
                  "consequence", "clinical_significance", "genotype", "alt_dosage", "af", "af_region"]]


def test_variant_review_filters_sorts_and_marks(tmp_path, monkeypatch):
    marks = _review_marks()
    before = len(marks)
    monkeypatch.setenv("USER", "clara")
    store = tmp_path / "reviews" / "variant-review.jsonl"
    review = VariantReview(_candidates(), store=str(store))
    assert review.reviewer == "clara"
    assert len(review.view) == 5 and not review.view["reviewed"].any()
    assert "reviewed" in review.sort_by.options

    review.gene.value = "MYH7"
    assert set(review.view["gene"]) == {"MYH7"} and len(review.view) == 3
    review.max_af.value = 0.002
    assert review.view["sample"].tolist() == ["S03"]
    review.max_af.value = review.max_af.max
    review.sort_by.value, review.ascending.value = "af", False
    assert review.view["af"].tolist() == [0.004, 0.004, 0.0008]
    review.sort_by.value, review.ascending.value = "position", True
    assert review.view["position"].tolist() == [1000, 1000, 1200]
    assert [v for _, v in review.row.options] == [("S01", "1:1000:A:G"), ("S02", "1:1000:A:G"),
                                                 ("S03", "1:1200:A:G")]
    assert "MYBPC3" not in review.table.value and "S03" in review.table.value

    review.row.value = ("S02", "1:1000:A:G")
    review.comment.value = "Homozygous; segregation <pending>."
    review.mark_button.click()
    assert "Marked S02" in review.status.value
    assert review.comment.value == ""

    (line,) = store.read_text().splitlines()
    record = json.loads(line)
    at = record.pop("at")
    assert record == {"sample": "S02", "variant_id": "1:1000:A:G", "gene": "MYH7", "reviewer": "clara",
                      "comment": "Homozygous; segregation <pending>.", "status": "reviewed"}
    assert datetime.fromisoformat(at).utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - datetime.fromisoformat(at)).total_seconds()) < 60

    # The audit event the audited kernel records (review.mark), with the store's path and the record.
    assert len(marks) == before + 1
    path, detail = marks[-1]
    assert path == str(store) and detail == dict(record, at=at)

    shown = review.view.set_index("sample")
    assert shown.loc["S02", "reviewed"] and not shown.loc["S01", "reviewed"]
    assert "&lt;pending&gt;" in review.table.value  # comments are shown escaped

    # Another session (or reviewer) reading the store sees it reviewed.
    again = VariantReview(_candidates(), store=store, reviewer="olof")
    reviewed = again.view[again.view["reviewed"]]
    assert reviewed[["sample", "variant_id", "reviewed_by", "review_comment"]].values.tolist() == [
        ["S02", "1:1000:A:G", "clara", "Homozygous; segregation <pending>."]]
    again.hide_reviewed.value = True
    assert len(again.view) == 4 and "S02" not in set(again.view["sample"])

    # A second mark appends (the latest record of a pair wins).
    again.mark_reviewed("S02", "1:1000:A:G", comment="Confirmed.")
    assert len(store.read_text().splitlines()) == 2
    reviews, unreadable = load_reviews(store)
    assert unreadable == 0 and reviews[("S02", "1:1000:A:G")]["reviewer"] == "olof"
    assert len(marks) == before + 2


def test_variant_review_refusals(tmp_path):
    marks = _review_marks()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    review = VariantReview(_candidates(), store=blocker / "reviews.jsonl", reviewer="clara")
    with pytest.raises(ValueError, match="not among the candidates"):
        review.mark_reviewed("S09", "1:1000:A:G")
    before = len(marks)
    review.row.value = ("S01", "2:5000:A:G")
    review.mark_button.click()  # the store cannot be written: said in the widget, not raised into the kernel log
    assert "Not marked: FileExistsError" in review.status.value
    assert not review.view["reviewed"].any()
    assert len(marks) == before + 1  # raised before the write was tried

    bad = tmp_path / "store.jsonl"
    bad.write_text('{"sample": "S01", "variant_id": "2:5000:A:G", "status": "reviewed", "reviewer": "x"}\nnot json\n')
    review = VariantReview(_candidates(), store=bad, reviewer="clara")
    assert review.unreadable == 1 and "could not be read" in review.status.value
    assert review.view["reviewed"].sum() == 1
    with pytest.raises(ValueError, match="missing column"):
        VariantReview(_candidates().drop(columns=["af"]), store=bad)
    assert os.path.getsize(bad) > 0

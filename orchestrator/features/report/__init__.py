"""`longtail report DIR`: one self-contained HTML page, DIR/report/index.html, that shows what a
campaign has found so far (docs/report.md says how to read every section).

The page is built from what the campaign directory holds and nothing else, read through the shared
readers: estimates/ (memorization, influence, pairs, summary.json) through orchestrator/estimates_files.py,
the shards in runs/ (convergence, per-run accuracy) through the verified shard reader, state/fold.npz
(per-run accuracy), failed/ and plan/. Every image is inline (base64 PNG drawn with matplotlib), so
the file can be mailed or archived alone and opens without a network. It can be written at any time:
while a campaign runs it says "in progress" and shows the estimates of the runs folded so far.

Nothing read from the campaign directory is unpickled, and a section that cannot be drawn says why on
the page instead of failing the report. The package, by job: inputs.py (what the report reads),
figures.py (drawing), sections.py, examples.py and proxies.py (each section's HTML), page.py (HTML
parts, style, the page); this module only puts the sections in order and writes the file.
"""

from __future__ import annotations

from workers.storage import atomic_write_text, makedirs

from orchestrator.features.report import page
from orchestrator.features.report.examples import (GALLERY_SIZE, INFLUENCERS, PAIR_ROWS, gallery_section,
                                                   influence_section)
from orchestrator.features.report.figures import SCATTER_LIMIT, _figure, _png, draw_in_vs_heldout
from orchestrator.features.report.inputs import Inputs, Pictures, convergence, image_shape, load_inputs
from orchestrator.features.report.page import _table
from orchestrator.features.report.proxies import section as proxies_section
from orchestrator.features.report.sections import (convergence_section, header, memorization_section,
                                                   privacy_section, runs_section, table1_section, utility_section)

SECTIONS = [("memorization", memorization_section), ("gallery", gallery_section),
            ("influence", influence_section), ("table1", table1_section),
            ("convergence", convergence_section), ("runs", runs_section), ("utility", utility_section),
            ("proxies", proxies_section), ("privacy", privacy_section)]

# what other modules and the tests use from the package
__all__ = ["GALLERY_SIZE", "INFLUENCERS", "PAIR_ROWS", "SCATTER_LIMIT", "SECTIONS", "Inputs", "Pictures",
           "_figure", "_png", "_table", "convergence", "draw_in_vs_heldout", "image_shape", "load_inputs",
           "memorization_section", "render", "utility_section", "write_report"]


def render(campaign_dir) -> tuple[str, Inputs]:
    """The report page of one campaign, and what it was built from (with notes on failed sections)."""
    inp = load_inputs(campaign_dir)
    return page.render(inp, header, SECTIONS), inp


def write_report(campaign_dir):
    """Write DIR/report/index.html (atomically: a reader never sees half a page); return its path and
    the notes of sections that could not be drawn."""
    text, inp = render(campaign_dir)
    path = inp.c.paths.report
    makedirs(path.parent)
    atomic_write_text(path, text)
    return path, inp.notes

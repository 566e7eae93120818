"""The documentation site builds with ``mkdocs build --strict``: any warning fails the build (a
cross-reference or link to nothing, a docstring griffe cannot parse, reST the site cannot show).
"""

import inspect
import pathlib
import re
import subprocess
import sys

import jaxce

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
    "",
    "options",
    "benchmarks",
    "api/softmax",
    "api/information",
    "api/losses",
    "api/distillation",
    "api/linear",
    "api/log_probs",
    "api/checked",
    "api/optax",
    "notebooks/derivations",
    "notebooks/training",
]


def test_docs_site_builds_strict_with_every_page(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not re.search(r"^WARNING ", proc.stderr, re.MULTILINE), proc.stderr

    pages = {page: (site / page / "index.html").read_text(encoding="utf-8") for page in PAGES}
    api = "".join(text for page, text in pages.items() if page.startswith("api/"))
    missing = [name for name in jaxce.__all__ if f'id="jaxce.{name}"' not in api]
    assert not missing, f"not in the API reference: {missing}"
    assert 'id="jaxce.losses.smooth_labels"' in pages["api/optax"]
    # Every argument of the losses, the shared options included, is a row of a parameter table.
    rows = set(re.findall(r"<td>\s*<code>(\w+)</code>\s*</td>", pages["api/losses"]))
    for fn in [jaxce.softmax_cross_entropy, jaxce.softmax_cross_entropy_with_integer_labels,
               jaxce.softmax_cross_entropy_with_sparse_labels]:
        assert set(inspect.signature(fn).parameters) <= rows, fn.__name__
    # The docstrings' reST arrives as math and links.
    for page, text in pages.items():
        for raw in [":math:", ":func:", ".. math::", "{options}"]:
            assert raw not in text, (page, raw)
    assert 'class="arithmatex"' in pages["api/softmax"]
    # nll_loss's :func:`softmax_cross_entropy_with_integer_labels`, relative to its module:
    link = 'title="jaxce.softmax_cross_entropy_with_integer_labels"'
    assert f'<a class="autorefs autorefs-internal" {link}' in pages["api/losses"]
    # The README's sections and the notebooks (with their outputs) are on the site.
    assert "<td><code>logit_softcap</code></td>" in pages["options"]
    assert "bench_losses.py" in pages["benchmarks"]
    assert "jupyter-wrapper" in pages["notebooks/training"]
    assert "data:image/png;base64" in pages["notebooks/training"]

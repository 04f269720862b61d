"""The documentation cannot drift: the site builds strictly (a broken link, a bad anchor or a
page outside the navigation fails), the configuration page is the command line's own help,
the benchmark summaries and page are what bench/summarize.py makes of the raw rows, and
README's numbers are the summaries'."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("get-started", "configuration", "training-output", "architecture",
                 "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").exists(), page


def test_the_configuration_page_is_the_help():
    proc = subprocess.run([sys.executable, "docs/gen_config.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    assert "--agent.optim.lr" in page and "--trust-env-module" in page


def test_benchmark_summaries_are_the_raw_rows():
    from bench.summarize import render

    for path, text in render().items():
        with open(path) as f:
            assert f.read() == text, f"{os.path.relpath(path, ROOT)} is stale: run python " \
                                     "bench/summarize.py"


def test_readme_is_short_and_its_numbers_are_the_summaries():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 200
    summary = open(os.path.join(ROOT, "bench", "results", "summary-learning.md")).read()
    reached = {m.group(1): m.group(2) for m in re.finditer(
        r"^\| (\S+) \| [^|]+ \| \*\*([\d.]+) min\*\*", summary, re.M)}
    rows = re.findall(r"^\| (\S+), [-\d]+ \| 2-core CPU \| ([\d.]+) min \|", readme, re.M)
    assert len(rows) == 3, rows
    for task, minutes in rows:
        assert reached.get(task) == minutes, (task, minutes, reached)
    # Every link of README into the repository resolves.
    for target in re.findall(r"\]\(([^)#]+)", readme):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_docs_and_help_cite_nothing_outside_the_repository():
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    docs = os.path.join(ROOT, "docs")
    texts += [open(os.path.join(docs, f)).read() for f in os.listdir(docs) if f.endswith(".md")]
    for text in texts:
        # The folder holding this checkout: a path of this machine, wherever it is.
        here = os.path.dirname(os.path.abspath(ROOT)) + os.sep
        for foreign in ("SPEC.md", "DESIGN.md", "STYLE.md", "../shared/SPEC", here):
            assert foreign not in text, foreign

"""README.md and the docs site: the site builds strictly, every page is in the nav, and the snippets run.

Snippet markers (an HTML comment on the line before a fenced block):
  <!-- runnable -->      run here: python blocks with python, bash blocks with bash, each in a fresh folder
  <!-- runnable: ray --> a python block run in this process on the session's Ray cluster (a tiny run each)
  <!-- cluster-only -->  needs a cluster, a registry or a network; never run, but checked for syntax
Every python block is compiled and every bash block goes through `bash -n`, marked or not.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"^(?:<!-- (?P<marker>[\w: -]+?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S)
MARKERS = {"runnable", "runnable: ray", "cluster-only"}
# pages other branches write; mkdocs.yml lists them in a commented block that is enabled at merge
OTHER_BRANCHES = {"compatibility.md", "trl.md", "sharded-loading.md", "jobs.md", "trust-checkpoints.md",
                  "trust-secrets-and-runs.md", "gpu-check.md"}


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _snippets() -> list[tuple[str, str | None, str, str]]:
    """(file, marker, language, code) for every fenced block of README.md and docs/."""
    out = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        for stray in re.finditer(r"<!-- (runnable|runnable: ray|cluster-only) -->\n(?!```)", text):
            pytest.fail(f"{path.name}: a {stray.group(1)} marker not followed by a fenced block")
        for m in FENCE.finditer(text):
            out.append((path.name, m.group("marker"), m.group("lang"), m.group("body")))
    return out


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags (pymdownx); plain values here
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    with open(REPO / "mkdocs.yml") as f:
        return yaml.load(f, Loader=Loader)


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    for page in _nav_pages(_mkdocs_config()["nav"]):
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} was not built"
    assert "scale-out" in (site / "index.html").read_text().lower()


def test_every_page_is_in_the_nav():
    config = _mkdocs_config()
    nav = set(_nav_pages(config["nav"]))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert nav <= pages, f"nav names missing pages: {nav - pages}"
    # a page from another branch arrives with the merge: enable its commented nav line then
    assert pages <= nav, f"pages missing from mkdocs.yml nav (uncomment or add them): {pages - nav}"
    text = (REPO / "mkdocs.yml").read_text()
    commented = re.findall(r"^(\s*)# (- .*\.md)$", text, re.M)
    assert {line.rsplit(" ", 1)[1] for _, line in commented} == OTHER_BRANCHES - pages
    # each commented line is valid nav YAML once uncommented
    for indent, line in commented:
        entry = yaml.safe_load(line)
        assert isinstance(entry, list) and isinstance(entry[0], dict), line


def test_readme_is_a_short_front_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    # the two commands that set up a fresh machine; the second is what CI runs
    assert "bash scripts/job.sh" in text and "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^pip install torch --index-url https://download\.pytorch\.org/whl/cpu", text, re.M)
    assert re.search(r"^pip install raytrainer", text, re.M)
    assert any(f == "README.md" and marker == "runnable" and lang == "python" for f, marker, lang, _ in _snippets())
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md|LICENSE)\)", text):
        assert (REPO / link).is_file(), f"README links to a missing {link}"
    for jargon in ("the issue's floor", "the issues' floor", "the seeds' config", "our users' notes"):
        for path in _markdown_files():
            assert jargon not in path.read_text(encoding="utf-8"), (path.name, jargon)


def test_config_reference_is_generated_from_the_dataclasses():
    page = runpy.run_path(str(REPO / "scripts" / "gen_config_reference.py"))["page"]()
    assert (DOCS / "config-reference.md").read_text(encoding="utf-8") == page, \
        "docs/config-reference.md is stale: python scripts/gen_config_reference.py"
    from raytrainer import TrainingArguments

    for field in ("num_workers", "storage_path", "max_failures", "strategy", "evaluate_on"):
        assert f"| `{field}` |" in page and field in TrainingArguments.__dataclass_fields__


def test_every_snippet_parses():
    snippets = _snippets()
    assert len(snippets) > 10
    for name, marker, lang, code in snippets:
        assert marker is None or marker in MARKERS, f"{name}: unknown marker {marker!r}"
        where = f"{name}: {code.splitlines()[0] if code else ''}"
        if lang == "python":
            compile(code, where, "exec")
        elif lang == "bash":
            result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
            assert result.returncode == 0, f"{where}: {result.stderr}"


def _runnable() -> list[tuple[str, str, str]]:
    seen, out = set(), []
    for name, marker, lang, code in _snippets():
        if marker == "runnable" and code not in seen:  # the README's example is also the quick start's
            seen.add(code)
            out.append((name, lang, code))
    return out


@pytest.mark.parametrize("name,lang,code", _runnable(), ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "")
def test_runnable_snippet(name, lang, code, tmp_path):
    assert lang in ("python", "bash"), f"{name}: a runnable {lang!r} block"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-"] if lang == "python" else ["bash", "-euo", "pipefail", "-s"]
    result = subprocess.run(command, input=code, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{name}:\n{code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def _ray_snippets() -> list[tuple[str, str]]:
    return [(name, code) for name, marker, lang, code in _snippets() if marker == "runnable: ray" and lang == "python"]


RAY_SNIPPET_OUTPUT = {"quickstart.md": "out/two-workers", "trl.md": "sft_out/checkpoint-4"}  # what each leaves


@pytest.mark.ray
@pytest.mark.parametrize("name,code", _ray_snippets(), ids=[name for name, _ in _ray_snippets()])
def test_ray_snippet(ray_cluster, tmp_path, monkeypatch, name, code):
    """The quick start's 2-worker run and the TRL page's SFT run, in this process: each reuses the session's
    Ray instead of starting one."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    assert (tmp_path / RAY_SNIPPET_OUTPUT[name]).is_dir()

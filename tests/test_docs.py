"""The documentation: the README stays a short entry, and docs/ builds as a site with no broken link, anchor or
page left out of the nav (mkdocs --strict)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_site_builds_strictly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "results" / "index.html").is_file()


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_every_headline_number_links_its_results_page():
    text = (ROOT / "README.md").read_text()
    headline = text.split("## Headline numbers", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in re.split(r"\n- ", headline)[1:]]
    assert bullets
    for b in bullets:
        assert "docs/results/" in b, b

"""The leaderboard's static site (issue 37), built from the committed entries and opened in a real
headless browser (Debian's chromium, driven by Playwright): every page loads without a console
error or a failed request, every link and image resolves to a file, and sorting a table works.

Skipped, with the reason, where chromium or playwright is absent. Set SPDBENCH_SITE_SCREENSHOTS=DIR
to save the overview, a suite page, a budget page and an entry page there (docs/img/site-*.png are made so).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from spdbench.report.board import load_board
from spdbench.report.site.build import write_site

ROOT = Path(__file__).parent.parent
ENTRIES = ROOT / "leaderboard" / "entries"
CHROMIUM = os.environ.get("SPDBENCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.slow  # checks the whole committed board (~50 entries): ~40 s on one core


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, list[Path]]:
    dirs = sorted(p for p in ENTRIES.iterdir() if p.is_dir())
    by_folder, skipped, verified = load_board(dirs)
    assert not skipped, skipped
    out = tmp_path_factory.mktemp("board") / "site"
    return out, write_site(by_folder, out, skipped, verified, board_dir=ENTRIES.parent)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _open(browser, path: Path):
    """A fresh page at `path`, with every console error, page error and failed request collected."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def _local(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file", f"a link leaves the file system (not relative): {url}"
    return Path(unquote(parsed.path))


def test_site_has_the_pages_and_only_relative_links(site):
    out, files = site
    names = {p.name for p in files}
    assert {"index.html", "entries.html", "suite-smoke.html", "budget-smoke-linf-16o255.html",
            "entry-smoke-spd-encoder.html", "entry-smoke-spd-encoder.csv"} <= names
    assert len([n for n in names if n.startswith("entry-") and n.endswith(".html")]) == \
        len([p for p in ENTRIES.iterdir() if p.is_dir()])
    for page in (p for p in files if p.suffix == ".html"):
        text = page.read_text()
        assert "http://" not in text and "https://" not in text, f"{page.name}: an absolute link (needs a network)"
        assert "file:" not in text and 'href="/' not in text and 'src="/' not in text, page.name


def test_every_page_loads_without_errors_and_every_link_resolves(site, browser):
    out, files = site
    page, problems = _open(browser, out / "index.html")
    for path in (p for p in files if p.suffix == ".html"):
        problems.clear()
        page.goto(path.as_uri(), wait_until="load")
        urls = page.eval_on_selector_all("a[href], img[src]", "els => els.map(e => e.href || e.src)")
        broken = [u for u in urls if not _local(u.split("#")[0]).is_file()]
        images = page.eval_on_selector_all("img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0))"
                                                  ".map(e => e.src)")
        assert not problems, f"{path.name}: {problems}"
        assert not broken, f"{path.name}: links to nothing: {broken[:5]}"
        assert not images, f"{path.name}: images that did not load: {images[:5]}"
    page.close()


def _column(table, col: int) -> list[str]:
    return table.evaluate("(t, c) => Array.from(t.tBodies[0].rows).map(r => r.cells[c].textContent.trim())", col)


def test_sorting_a_table_orders_its_rows(site, browser):
    out, _ = site
    page, problems = _open(browser, out / "budget-smoke-linf-16o255.html")
    table = page.locator("main table.sortable").first
    heads = table.locator("thead th").all_text_contents()
    col = next(i for i, h in enumerate(heads) if h.startswith("imperceptibility PSNR"))
    before = [float(v) for v in _column(table, col)]
    rows_before = sorted(_column(table, 1))
    table.locator("thead th").nth(col).click()
    after = [float(v) for v in _column(table, col)]
    assert after == sorted(after) and before != after, (before, after)
    table.locator("thead th").nth(col).click()
    again = [float(v) for v in _column(table, col)]
    assert again == sorted(after, reverse=True)
    assert sorted(_column(table, 1)) == rows_before, "sorting moves rows whole: no row lost or split"
    page.close()
    assert not problems, problems


def test_screenshots(site, browser, tmp_path):
    """The overview, a suite page, a budget page and an entry page render to non-blank images (kept small: a
    1280 x 900 viewport, palette PNG); saved to SPDBENCH_SITE_SCREENSHOTS when it is set."""
    from PIL import Image

    out, _ = site
    dest = Path(os.environ.get("SPDBENCH_SITE_SCREENSHOTS") or tmp_path)
    for name, page_file in (("overview", "index.html"), ("suite", "suite-smoke.html"),
                            ("budget", "budget-smoke-linf-16o255.html"),
                            ("entry", "entry-smoke-spd-encoder.html")):
        page, problems = _open(browser, out / page_file)
        png = page.screenshot(full_page=False)
        page.close()
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert len(image.resize((64, 48)).getcolors(64 * 48) or ()) > 20, f"{name}: a blank page"
        image.quantize(colors=128).save(dest / f"site-{name}.png", optimize=True)
        assert not problems, problems
    assert all((dest / f"site-{n}.png").stat().st_size < 400_000
                                           for n in ("overview", "suite", "budget", "entry"))

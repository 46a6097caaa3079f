"""The README's picture of the leaderboard page: one budget's tables, as a browser shows them.

Why a script: the picture must be re-made whenever the board changes (a new row, column or
challenge), from the committed page, the same way each time: headless Chromium (Debian's, driven
by Playwright, as tests/test_site.py does), 1400 px wide, scrolled to the section heading given.

    python scripts/page-screenshot.py [--page leaderboard/index.html] [--section "smoke · linf eps 16/255"]
                                      [--out docs/img/leaderboard-page.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", default="leaderboard/index.html")
    ap.add_argument("--section", default="img2img · smoke · linf eps 16/255")
    ap.add_argument("--out", default="docs/img/leaderboard-page.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        page.goto(Path(args.page).resolve().as_uri())
        heading = page.locator("h2", has_text=args.section).first
        heading.scroll_into_view_if_needed()
        page.evaluate("(el) => window.scrollTo(0, el.getBoundingClientRect().top + window.scrollY - 8)",
                      heading.element_handle())
        page.screenshot(path=args.out, full_page=False)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

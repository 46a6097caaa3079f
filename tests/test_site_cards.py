"""The suite protocol card, the submission spec and the cost card (issue 37): read from the suite's
definition and the records, never typed in -- a changed suite changes its card; a record without a
peak-memory field still loads and says "not recorded"."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from spdbench.cli import main
from spdbench.report.site.cost import cost_row, device_text, peak_memory_text
from spdbench.report.site.protocol import protocol_card, submission_spec
from spdbench.store.records import Record
from spdbench.suites import get_suite

ENTRY = Path(__file__).parent.parent / "leaderboard" / "entries" / "smoke-spd-encoder" / "records"


def test_the_protocol_card_is_read_from_the_suite():
    suite = get_suite("smoke")
    card = dict(protocol_card(suite))
    assert card["edit steps"] == str(suite.edit.steps) and card["guidance"] == f"{suite.edit.guidance:g}"
    assert all(p in card["prompts"] for p in suite.prompts) and card["budgets"].endswith(", ".join(suite.eps))
    assert card["metrics"].startswith("ssim (SSIM)")
    changed = dict(protocol_card(dataclasses.replace(suite, edit=dataclasses.replace(suite.edit, steps=7),
                                                     prompts=("P1",))))
    assert changed["edit steps"] == "7" and "watercolor" in changed["prompts"] and "snow" not in changed["prompts"]
    floor = getattr(suite, "floor", None)
    if getattr(floor, "ssim", None) is not None:  # the suite defines an invisibility floor: the card shows it
        assert f"SSIM ≥ {floor.ssim:g}" in card["invisibility floor"]
    spec = " ".join(submission_spec(suite))
    assert "P3, P4 × splits train, test" in spec and "records/*.json" in spec and "isolation" in spec


def test_list_suites_prints_every_card_and_spec(capsys):
    assert main(["list", "--suites", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"smoke", "sd15-spd"} <= set(data)
    assert data["sd15-spd"]["card"]["edit steps"] == str(get_suite("sd15-spd").edit.steps)
    assert any("prompts P1, P2, P3, P4" in item for item in data["sd15-spd"]["submission_spec"])
    assert main(["list", "--suites"]) == 0
    assert "invisibility floor" in capsys.readouterr().out


def test_the_cost_card_names_the_device_and_reads_peak_memory_defensively():
    raw = json.loads(sorted(ENTRY.glob("*.json"))[0].read_text())
    assert "peak_rss_bytes" not in raw["timing"], "a committed record from before the field"
    old = Record.model_validate(raw)
    assert peak_memory_text([old]) == "not recorded"
    assert device_text(old) == "cpu (x86_64, 2 threads)"
    cpu = old.model_copy(update={"timing": old.timing.model_copy(update={"peak_rss_bytes": 300 * 2**20})})
    assert peak_memory_text([old, cpu]) == "300 MB (attack process peak RSS, CPU)"
    gpu = old.model_copy(update={"timing": old.timing.model_copy(update={"peak_memory_bytes": 2**30})})
    assert peak_memory_text([cpu, gpu]) == "1024 MB (CUDA peak allocated)"
    row = cost_row([old, cpu])
    assert row[0] == "cpu (x86_64, 2 threads)" and row[3].startswith("enc ") and row[-1].startswith("300 MB")


def test_the_site_of_two_entries_links_its_pages_and_shows_the_cards(tmp_path):
    """The site's pages from two committed entries: each method row links its entry page, every
    relative link and image lands on a file, and the protocol, spec and cost cards are on the pages
    (tests/test_site.py opens the whole board's site in a browser)."""
    import re

    from spdbench.report.board import load_board
    from spdbench.report.site.build import write_site

    entries = ENTRY.parent.parent
    by_folder, skipped, verified = load_board([entries / "smoke-none", entries / "smoke-spd-encoder"])
    out = tmp_path / "site"
    files = write_site(by_folder, out, skipped, verified)
    names = {p.name for p in files}
    assert {"index.html", "entries.html", "suite-smoke.html", "budget-smoke-linf-8o255.html",
            "budget-smoke-linf-16o255.html", "entry-smoke-none.html", "entry-smoke-spd-encoder.html",
            "entry-smoke-spd-encoder.csv"} <= names
    for page in (p for p in files if p.suffix == ".html"):
        for link in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            if link == "data:,":  # the empty favicon: no request for /favicon.ico
                continue
            assert not re.match(r"^[a-z]+:|^/", link), f"{page.name}: not a relative link: {link}"
            assert (out / link.split("#")[0]).resolve().is_file(), f"{page.name}: {link} leads nowhere"
    budget = (out / "budget-smoke-linf-16o255.html").read_text()
    assert '<a href="entry-smoke-spd-encoder.html">spd-encoder</a>' in budget and "Cost card" in budget
    suite = (out / "suite-smoke.html").read_text()
    assert "Protocol card" in suite and "edit steps" in suite and "a complete entry" in suite
    entry = (out / "entry-smoke-spd-encoder.html").read_text()
    assert "cpu (x86_64, 2 threads)" in entry and "not recorded" in entry and "Per-image values" in entry
    overview = (out / "index.html").read_text()
    assert overview.index('class="examples"') < overview.index("<table"), "the example photos come first"


def test_an_entry_page_lists_its_challenges_with_what_they_ran():
    """Every verified challenge of the entry, also one that lowered nothing, with its purifier (and
    a mismatched editor's model) and its mean SSIM per budget."""
    from spdbench.report.site.pages import challenge_rows
    from spdbench.verify.challenge import Challenge, ChallengeCell

    def challenge(name, purifier, model=None, ssim=(0.5, 0.7)):
        cell = ChallengeCell(cell_id="c", eps_label="16/255", prompt_key="P3", split="test", image_names=["a", "b"],
                             values={"ssim": list(ssim)}, purified_sha256=["0" * 64, "1" * 64])
        return Challenge(name=name, entry="e", suite="smoke", purifier={"name": purifier}, editor_fingerprint="f",
                         device="cpu", cells=[cell], purifier_model=model)

    rows = challenge_rows([challenge("z", "platform"), challenge("a", "swap-vae-tiny-b", {"name": "tiny-b"})])
    assert [r["name"] for r in rows] == ["a", "z"]
    assert rows[0]["what"] == "purifier swap-vae-tiny-b with model tiny-b" and rows[1]["what"] == "purifier platform"
    assert rows[0]["ssim"] == "16/255: 0.6000" and rows[0]["split"] == "test"

"""The leaderboard as a static site (`spdbench leaderboard` writes it to OUT/site/): an overview,
one page per suite and per budget, one page per entry, rendered from Jinja2 templates
(spdbench/report/templates/) with relative links only, so it opens from the file system and
from any static host that serves the leaderboard folder."""

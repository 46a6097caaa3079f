"""Records -> pages: the leaderboard tables, Markdown/HTML, plots, the gallery, `spdbench show`."""

"""One owner per file format: records, run folders, perturbations, networks, strips, provenance."""

"""What an entry claims, checked against itself, its perturbations and its suite -- without re-editing.

Every number a leaderboard shows is derived from per-image values, so the per-image lists must be
whole (one value per image, finite, in the metric's range) and every stated mean must equal the mean
of its list. The labels must be tied to the data: one method per entry, the suite's own settings,
budgets on the 8-bit grid that the stored perturbations respect, and exactly one record per claimed
(eps, prompt, split) cell -- nothing dropped, nothing duplicated. `strict=False` is the lighter check
the leaderboard build applies to local run folders (failed cells and partial grids allowed).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from spdbench.budget import Budget, format_eps
from spdbench.harness.editing import EditSettings, PROMPTS, image_seed
from spdbench.verify.entry import EntryFiles, check_name, digest_verdict, scan
from spdbench.errors import RecordError, SpdbenchError
from spdbench.scoring.metrics import DEFAULT_METRICS, METRICS, get_metric, list_metrics
from spdbench.purifiers.base import PURIFIERS, drawn
from spdbench.suites import SUITES, get_suite
from spdbench.store.records import Record, Status, non_finite_fields, record_from_data
from spdbench.harness.plan import installed_attack
from spdbench.data.masks import mask_set, mask_sha256
from spdbench.data.photos import split_indices
from spdbench.store.networks import MAX_VALUES, load_network
from spdbench.store.perturbations import delta_sha256, load_delta

#: float32 rounding takes an honest SSIM / FSIM of identical images to 1.0000002: a range bound
#: is checked with this slack (far below any difference a forged value would need)
RANGE_TOL = 1e-5
#: a stated mean must equal the mean of its per-image list to this (float32 rounding)
MEAN_TOL = 1e-5
#: settings that identify a method: every record of an entry must agree on them
METHOD_FIELDS = ("attack", "attack_params", "preset", "universal", "amortized", "suite", "suite_config", "norm", "edit",
                 "attack_seed", "split_seed", "isolation")
_CELL_ID = re.compile(r"^(?P<prefix>.+)__[0-9a-f]{10}$")
#: suite settings that may differ between a run and the suite (the grid being run, the prose, and
#: the attack's time limit, which only decides whether a cell finishes)
_SUITE_FREE = ("eps", "prompts", "description", "attack_timeout_s")
#: suite settings added after records were made: a record without one predates it (its view is
#: read from its param_sources: steps "suite" = iteration-matched), one with it must agree
_SUITE_ADDED = ("attack_work",)


@dataclass
class Cell:
    rel: str
    record: Record


@dataclass
class Claims:
    """The parsed records of an entry, grouped by budget, and what is wrong with them."""

    cells: list[Cell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return [c.record for c in self.cells]

    @property
    def ok_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.record.status == Status.ok]

    def groups(self) -> dict[str, list[Cell]]:
        """Finished cells by eps label (one cell group = one stored perturbation)."""
        out: dict[str, list[Cell]] = {}
        for c in self.ok_cells:
            out.setdefault(c.record.eps_label, []).append(c)
        return dict(sorted(out.items(), key=lambda kv: kv[1][0].record.eps))


def parse_record(data: Any, rel: str) -> Record:
    """A record from parsed JSON (see results.read_record: kind, schema version, then the model)."""
    return record_from_data(data, rel)


def check(entry: EntryFiles, suite=None, strict: bool = True) -> Claims:
    """Parse and check every record of a scanned folder; `suite` (a Suite) defaults to the
    registered suite each record names. Problems are collected, one line each."""
    claims = Claims()
    records = entry.of_kind("record")
    if not records:
        claims.problems.append(f"{entry.folder} holds no records (expected records/*.json)")
        return claims
    for f in records:
        try:
            rec = parse_record(f.parsed, f.rel)
        except RecordError as exc:
            claims.problems.append(str(exc))
            continue
        claims.cells.append(Cell(f.rel, rec))
    if claims.problems:
        return claims
    for c in claims.cells:
        claims.problems += [f"{c.rel}: {p}" for p in record_problems(c.record, c.rel, entry, strict)]
    if claims.problems or not strict:
        claims.problems += [] if claims.problems else _cell_set_problems(claims, None, strict=False)
        return claims
    claims.problems += _method_problems(claims)
    if claims.problems:
        return claims
    try:
        suite = suite_of(claims.cells[0].record, suite)
    except SpdbenchError as exc:
        claims.problems.append(str(exc))
        return claims
    claims.problems += _suite_problems(claims.cells[0], suite)
    claims.problems += _cell_set_problems(claims, suite, strict=True)
    return claims


def suite_of(rec: Record, suite=None):
    """The suite a record is checked against: `suite` (which must carry the claimed name) or the registered one."""
    if suite is None:
        return get_suite(rec.suite)
    if suite.name != rec.suite:
        raise RecordError(f"the records claim suite {rec.suite!r}, checked against suite {suite.name!r}")
    return suite


def method_key(rec: Record) -> tuple:
    """What makes two records the same leaderboard row: method, its parameters, suite and budget norm."""
    return (rec.attack, rec.preset, _canon(rec.attack_params), rec.suite, rec.norm)


# --- one record ----------------------------------------------------------------------------------
def record_problems(rec: Record, rel: str, entry: EntryFiles, strict: bool) -> list[str]:
    """Everything one record must satisfy on its own."""
    named = _name_problems(rec)
    if named:
        return named
    out = _cell_id_problems(rec, rel)
    if rec.status != Status.ok:
        return out + _unfinished_problems(rec, strict)
    out += _run_problems(rec, strict)
    out += _budget_problems(rec)
    bad = non_finite_fields(rec)
    if bad:
        out.append(f"holds non-finite numbers (NaN/Inf) at {', '.join(bad[:3])}; a NaN claim never passes")
        return out
    out += _list_problems(rec)
    out += _count_problems(rec)
    out += _perturbation_ref_problems(rec, entry)
    out += _network_problems(rec, entry)
    return out


def _name_problems(rec: Record) -> list[str]:
    """The attack and preset names are safe names (they become file and table text); checked first."""
    try:
        check_name("attack name", rec.attack)
        if rec.preset is not None:
            check_name("preset name", rec.preset)
    except RecordError as exc:
        return [str(exc)]
    return []


def _cell_id_problems(rec: Record, rel: str) -> list[str]:
    """The file is named by its cell_id, and the cell_id names the record's own cell."""
    out = []
    if rel != f"records/{rec.cell_id}.json":
        out.append(f"file name does not match its cell_id {rec.cell_id!r}")
    m = _CELL_ID.match(rec.cell_id)
    prefix = f"{rec.attack}__{rec.norm}-{rec.eps_label.replace('/', 'o')}__{rec.prompt_key}__{rec.split.value}"
    if not m or m.group("prefix") != prefix:
        out.append(f"cell_id {rec.cell_id!r} does not name its own cell ({prefix}__<hash>)")
    return out


def _unfinished_problems(rec: Record, strict: bool) -> list[str]:
    """A failed cell: refused in an entry (strict), allowed in a local run folder."""
    if not strict:
        return []
    return [f"cell failed ({(rec.error or '')[:200]}); an entry holds finished cells only -- re-run it"]


def _run_problems(rec: Record, strict: bool) -> list[str]:
    """How the cell ran: in a worker process (strict), with its prompt key's own text."""
    out = []
    if strict and rec.isolation not in ("process", "sandbox"):
        out.append(f"isolation is {rec.isolation!r}: the attack ran inside the harness's process (debug mode); "
                   "verify and submit accept only isolation 'sandbox' or 'process'")
    if rec.prompt_key not in PROMPTS or rec.prompt != PROMPTS[rec.prompt_key]:
        out.append(f"prompt {rec.prompt!r} is not the text of prompt key {rec.prompt_key!r}")
    return out


def _count_problems(rec: Record) -> list[str]:
    """Flags are safe names; model-call counts, durations and memory are not negative."""
    out = [f"flag {f!r} is not a safe name" for f in rec.flags if not isinstance(f, str) or not
           re.match(r"^[a-z0-9][a-z0-9:._-]{0,63}$", f)]
    if any(v < 0 for v in rec.model_calls.values()):
        out.append("model_calls holds a negative count")
    t = rec.timing
    if any(v is not None and v < 0 for v in (t.attack_wall_s, t.attack_device_s, t.fit_wall_s, t.per_image_s,
                                             t.edit_wall_s, t.score_wall_s, t.peak_memory_bytes, t.compile_s)):
        out.append("timing holds a negative duration or memory")
    return out


def _perturbation_ref_problems(rec: Record, entry: EntryFiles) -> list[str]:
    """The record points at a perturbation file of this folder, with a well-formed hash."""
    out = []
    pf = rec.perturbation_file
    if not pf or pf not in entry.files or entry.files[pf].kind != "perturbation":
        out.append(f"perturbation_file {pf!r} is not a perturbations/*.safetensors file of this folder")
    if not isinstance(rec.perturbation_sha256, str) or not re.match(r"^[0-9a-f]{64}$", rec.perturbation_sha256):
        out.append(f"perturbation_sha256 {rec.perturbation_sha256!r} is not a sha256 (64 hex digits)")
    return out


def _network_problems(rec: Record, entry: EntryFiles) -> list[str]:
    """An amortized record points at its network file (checked against it in check_networks); no
    other record carries one."""
    if not rec.amortized:
        return [] if rec.network is None else ["carries a network but does not claim amortized=true"]
    if rec.universal:
        return ["claims both universal and amortized; an attack is one kind"]
    net = rec.network
    if not isinstance(net, dict):
        return ["claims amortized but names no network (expected network: {file, sha256, values, bytes, "
                "apply_batch_size})"]
    out = []
    f = net.get("file")
    if not isinstance(f, str) or f not in entry.files or entry.files[f].kind != "network":
        out.append(f"network.file {_short(f)} is not a networks/*.safetensors file of this folder")
    if not isinstance(net.get("sha256"), str) or not re.match(r"^[0-9a-f]{64}$", net["sha256"]):
        out.append(f"network.sha256 {_short(net.get('sha256'))} is not a sha256 (64 hex digits)")
    for key in ("values", "bytes", "apply_batch_size"):
        v = net.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            out.append(f"network.{key} {_short(v)} is not a whole number >= 1")
    extra = sorted(set(net) - {"file", "sha256", "values", "bytes", "apply_batch_size"})
    if extra:
        out.append(f"network holds unknown fields {extra}")
    return out


def _budget_problems(rec: Record) -> list[str]:
    try:
        budget = Budget(rec.norm, rec.eps)
    except SpdbenchError as exc:
        return [f"budget {rec.norm} {rec.eps!r}: {exc}"]
    out = []
    if rec.eps_label != format_eps(budget.eps):
        out.append(f"eps_label {rec.eps_label!r} does not state its eps {rec.eps!r} (= {format_eps(budget.eps)})")
    # eps itself may be off the 1/255 grid (the papers' presets use 0.03, 0.06): the stored 8-bit
    # perturbation is checked against it (check_perturbations), and so can only reach floor(255 eps)
    return out


def _list_problems(rec: Record) -> list[str]:
    """Per-image lists: one value per image, in range; each stated mean = the mean of its list."""
    n = len(rec.image_names)
    if n == 0:
        return ["lists no images"]
    out = _image_list_problems(rec, n)
    blocks = [("protection", rec.protection, rec.protection_mean),
              ("imperceptibility", rec.imperceptibility, rec.imperceptibility_mean)]
    if set(rec.purified) != set(rec.purified_mean):
        out.append(f"purified {sorted(rec.purified)} and purified_mean {sorted(rec.purified_mean)} name different purifiers")
    blocks += [(f"purified.{p}", rec.purified[p], rec.purified_mean.get(p, {})) for p in sorted(rec.purified)]
    required = required_metrics(rec)
    for where, values, means in blocks:
        out += _metric_block_problems(where, values, means, required, n)
    return out


def _metric_block_problems(where: str, values: dict, means: dict, required: Sequence[str], n: int) -> list[str]:
    """One block (protection, imperceptibility, or after one purifier): its metric set, then each list."""
    problems = _metric_set_problems(where, values, means, required)
    if problems:
        return problems
    return [p for m in list_metrics() if m in values for p in _metric_values_problems(where, m, values[m], means[m], n)]


def required_metrics(rec: Record) -> tuple[str, ...]:
    """The metrics every block of a record must hold: its suite's (`Suite.metrics`, from the registered
    suite, never from the record's own word), or the default four for a suite not registered here."""
    suite = SUITES.get(rec.suite, None)
    return tuple(suite.metrics) if suite is not None else DEFAULT_METRICS


def _metric_set_problems(where: str, values: dict, means: dict, required: Sequence[str]) -> list[str]:
    """The required metrics are there (others may be too: an entry measured after a metric was added),
    each with its mean, and each is registered (its range is what the values are checked against)."""
    if set(values) != set(means):
        return [f"{where} holds metrics {sorted(values)} but means of {sorted(means)}"]
    missing = [m for m in required if m not in values]
    if missing:
        return [f"{where} lacks the required metric(s) {missing}: it holds {sorted(values)}"]
    unknown = sorted(m for m in values if m not in METRICS)
    if unknown:
        return [f"{where} holds metric(s) {unknown} that are not registered (registered: {list_metrics()})"]
    return []


def _metric_values_problems(where: str, m: str, v: list, mean_stated: float, n: int) -> list[str]:
    """One metric's per-image list: one value per image, in the metric's registered range (with the
    float-rounding slack RANGE_TOL), and its stated mean equal to the list's mean."""
    if len(v) != n:
        return [f"{where}.{m} holds {len(v)} values for {n} images"]
    out = []
    lo, hi = get_metric(m).range
    if any(not lo - RANGE_TOL <= x <= hi + RANGE_TOL for x in v):
        out.append(f"{where}.{m} holds a value outside [{lo}, {hi}]")
    mean = float(np.mean(np.asarray(v, dtype=np.float64)))
    if not abs(mean - mean_stated) <= MEAN_TOL * max(1.0, abs(mean)):
        out.append(f"{where}_mean.{m} is {mean_stated!r} but its per-image values average {mean!r}")
    return out


def _image_list_problems(rec: Record, n: int) -> list[str]:
    """One hash and one edit seed per image name; no image named twice."""
    out = []
    if len(rec.image_sha256) != n or len(rec.edit_seeds) != n:
        out.append(f"{n} image_names but {len(rec.image_sha256)} image_sha256 and {len(rec.edit_seeds)} edit_seeds")
    if len(set(rec.image_names)) != n:
        out.append("image_names lists an image twice")
    return out


# --- across records ------------------------------------------------------------------------------
def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _method_problems(claims: Claims) -> list[str]:
    """One method per entry: every record agrees on the settings that define it."""
    first = claims.cells[0].record
    for c in claims.cells[1:]:
        for name in METHOD_FIELDS:
            a, b = getattr(first, name), getattr(c.record, name)
            if _canon(_plain(a)) != _canon(_plain(b)):
                mine, theirs = _differing(_plain(b), _plain(a))
                return [f"{c.rel}: {name} {mine} differs from {claims.cells[0].rel}'s {theirs}; an entry "
                        "holds one method on one suite (submit each run folder separately)"]
        if (c.record.target.fingerprint, c.record.target.dtype) != (first.target.fingerprint, first.target.dtype):
            return [f"{c.rel}: target {c.record.target.fingerprint} differs from {claims.cells[0].rel}'s"]
    return []


def _differing(b: Any, a: Any) -> tuple[str, str]:
    """Two differing values as a refusal shows them, whole (never cut): for two dicts only the keys
    whose values differ ({"steps": 5} vs {"steps": 40}), else both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if _canon(a.get(k)) != _canon(b.get(k)) or (k in a) != (k in b))
        return _canon({k: b.get(k) for k in keys}), _canon({k: a.get(k) for k in keys})
    return _canon(b), _canon(a)


def _plain(v: Any) -> Any:
    return v.model_dump() if hasattr(v, "model_dump") else getattr(v, "value", v)


def _short(v: Any) -> str:
    text = _canon(_plain(v))
    return text if len(text) <= 80 else text[:77] + "..."


def _preset_budget_is(rec: Record) -> bool:
    """A paper preset runs at its own budget (attack_plan): the record's norm and eps are that
    preset's, as the installed attack class declares it (not as the record says)."""
    if not rec.preset:
        return False
    try:
        budget = installed_attack(rec.attack).preset_budgets.get(rec.preset)
    except SpdbenchError:
        return False
    return budget is not None and budget.norm == rec.norm and abs(budget.eps - rec.eps) < 1e-9


def _suite_problems(cell: Cell, suite) -> list[str]:
    """The record's suite settings are the suite's own (the grid run may be a part of it)."""
    rec = cell.record
    want = json.loads(json.dumps(suite.to_dict()))
    got = rec.suite_config
    out = []
    for key, value in want.items():
        if key in _SUITE_FREE or (key in _SUITE_ADDED and key not in got):
            continue
        if _canon(got.get(key)) != _canon(value):
            out.append(f"{cell.rel}: suite_config.{key} is {_short(got.get(key))}, suite {suite.name!r} defines "
                       f"{_short(value)}")
    if _canon(rec.edit) != _canon(want["edit"]):
        out.append(f"{cell.rel}: edit settings {_short(rec.edit)} are not suite {suite.name!r}'s {_short(want['edit'])}")
    if rec.norm != suite.norm and not _preset_budget_is(rec):
        out.append(f"{cell.rel}: norm {rec.norm!r}, suite {suite.name!r} uses {suite.norm!r}")
    if (rec.split_seed, rec.attack_seed) != (suite.split_seed, suite.attack_seed):
        out.append(f"{cell.rel}: split/attack seeds {rec.split_seed}/{rec.attack_seed} are not the suite's "
                   f"{suite.split_seed}/{suite.attack_seed}")
    # each randomized purifier drawn as often as the record says (more draws only lower a worst case)
    draws = rec.suite_config.get("purifier_draws", suite.purifier_draws)
    wanted = {p.name for p in drawn([PURIFIERS.get(n) for n in suite.purifiers if n in PURIFIERS], draws)} \
        if isinstance(draws, int) and draws >= 1 else set(suite.purifiers)
    if set(rec.purified) != wanted | set(suite.purifiers):
        out.append(f"{cell.rel}: purifiers {sorted(rec.purified)}, suite {suite.name!r} scores {sorted(suite.purifiers)}"
                   + (f" drawn {draws} times" if draws != 1 else ""))
    return out + _purifier_settings_problems(cell)


def _purifier_settings_problems(cell: Cell) -> list[str]:
    """Each purifier's recorded settings are the ones the registered purifier of that name is called
    with (`fn(images, **settings)`): a record cannot state a purification other than the one that runs."""
    out = []
    for name, stated in (cell.record.suite_config.get("purifier_settings") or {}).items():
        purifier = PURIFIERS.get(name, None)
        if purifier is None:
            out.append(f"{cell.rel}: purifier_settings names {name!r}, which is not a registered purifier")
        elif _canon(stated) != _canon(purifier.to_dict()):
            out.append(f"{cell.rel}: purifier_settings.{name} is {_short(stated)}, but purifier {name!r} runs as "
                       f"{_short(purifier.to_dict())}")
    return out


def _cell_set_problems(claims: Claims, suite, strict: bool) -> list[str]:
    """No duplicated cell; with a suite: every claimed eps has every prompt x split, the same image
    lists for a split across records, and one perturbation file per eps."""
    out = _duplicate_cells(claims)
    if out or not strict:
        return out
    for eps, cells in claims.groups().items():
        out += _group_problems(eps, cells, suite)
    out += _shared_file_problems(claims)
    out += _split_image_problems(claims)
    return out


def _duplicate_cells(claims: Claims) -> list[str]:
    """Two records of one cell (same method, budget, prompt and split): one would hide the other."""
    out, seen = [], {}
    for c in claims.ok_cells:
        r = c.record
        key = (r.attack, r.preset, _canon(r.attack_params), r.suite, r.norm, r.eps_label, r.prompt_key, r.split.value)
        if key in seen:
            out.append(f"duplicate cell {r.attack} eps {r.eps_label} {r.prompt_key} {r.split.value}: {seen[key]} "
                       f"and {c.rel} (one record per cell)")
        seen[key] = c.rel
    return out


def _group_problems(eps: str, cells: list[Cell], suite) -> list[str]:
    """One cell group (one eps): every prompt x split of the suite and no other prompt, one
    perturbation and one network."""
    out = _prompt_grid_problems(eps, cells, suite)
    files = {(c.record.perturbation_file, c.record.perturbation_sha256) for c in cells}
    if len(files) != 1:
        out.append(f"eps {eps}: records point at {len(files)} different perturbation files/hashes; one cell "
                   "group has one perturbation")
    nets = {_canon(c.record.network) for c in cells}
    if len(nets) != 1:
        out.append(f"eps {eps}: records point at {len(nets)} different networks; one cell group has one "
                   "fitted network")
    return out


def _prompt_grid_problems(eps: str, cells: list[Cell], suite) -> list[str]:
    """The group's cells are exactly the suite's prompts x (train, test): none missing, none foreign."""
    prompts = list(suite.prompts)
    have = {(c.record.prompt_key, c.record.split.value) for c in cells}
    missing = [f"{p} {s}" for p in prompts for s in ("train", "test") if (p, s) not in have]
    extra = sorted(f"{p} {s}" for p, s in have if p not in prompts)
    out = []
    if missing:
        out.append(f"eps {eps}: cells {', '.join(missing)} are missing; an entry claims every prompt x split "
                   f"of suite {suite.name!r} ({', '.join(prompts)}) for each eps it reports")
    if extra:
        out.append(f"eps {eps}: cells {', '.join(extra)} use prompts outside suite {suite.name!r}")
    return out


def _shared_file_problems(claims: Claims) -> list[str]:
    """A perturbation or network file belongs to one budget (two budgets cannot share one delta)."""
    by_file: dict[str, set] = {}
    for c in claims.ok_cells:
        by_file.setdefault(c.record.perturbation_file, set()).add(c.record.eps_label)
        if c.record.network:
            by_file.setdefault(c.record.network.get("file"), set()).add(c.record.eps_label)
    return [f"{f} is claimed by several budgets ({', '.join(sorted(e))})" for f, e in by_file.items() if len(e) > 1]


def _split_image_problems(claims: Claims) -> list[str]:
    """Each split's records agree on their images, and no image is in both splits."""
    out = []
    for split in ("train", "test"):
        lists = {(_canon(c.record.image_names), _canon(c.record.image_sha256), _canon(c.record.edit_seeds))
                 for c in claims.ok_cells if c.record.split.value == split}
        if len(lists) > 1:
            out.append(f"the {split} records disagree on their images (names, hashes or seeds)")
    train = {n for c in claims.ok_cells if c.record.split.value == "train" for n in c.record.image_names}
    test = {n for c in claims.ok_cells if c.record.split.value == "test" for n in c.record.image_names}
    if train & test:
        out.append(f"images {sorted(train & test)[:3]} are in both the train and the test split")
    return out


# --- the stored perturbations ------------------------------------------------------------------
#: a universal entry: at most this fraction of pixel positions may differ by one 8-bit level between
#: images (rounding x + delta to the grid breaks ties differently for different x); see docs/security.md
UNIVERSAL_TIE_FRACTION = 0.01
#: float32's unit roundoff: the harness measures the applied norm in float32
_F32_U = 2.0 ** -24


def applied_norm_tolerance(norm: str, applied: float, values_per_image: int) -> float:
    """How far a record's `max_norm_applied` (float32, from the harness) may sit from the stored
    8-bit delta's exact norm (float64, here) for an honest run.

    Why: L-inf is one max, exact to a few ulps (1e-5 slack). An L2 norm sums n = 3 H W squares in
    float32, and that rounding grows with n: measured 2e-6 relative on 64 px, 1.3e-5 on 128 px and
    1.1e-4 on 512 px (torch, CPU, eps 8), so a fixed 1e-5 refused honest L2 runs. Allowed: the
    bound for any summation order, n u / 2 relative (u = 2^-24; the square root halves it), plus
    sqrt(n) u for rounding x and x + delta to float32. The stated value is informational: the
    budget is checked exactly on the stored 8-bit delta, so this slack lets nothing over budget in.
    """
    if norm == "linf":
        return 1e-5
    return 1e-5 + abs(applied) * values_per_image * _F32_U / 2 + math.sqrt(values_per_image) * _F32_U


def check_perturbations(claims: Claims, entry: EntryFiles, suite, images=None) -> dict:
    """Load each cell group's perturbation and hold it against what the records claim: the shape of
    the suite's images, the hash, every image's norm within eps on the 8-bit grid, the stated
    `max_norm_applied`; with the clean `images`, that x + delta stays on [0, 255] and that a
    `universal` claim is one delta. Returns {eps label: delta255}; problems go to `claims`."""
    deltas = {}
    for eps, cells in claims.groups().items():
        delta = _checked_delta(claims, eps, cells, entry, suite, images)
        if delta is not None:
            deltas[eps] = delta
    return deltas


def _checked_delta(claims: Claims, eps: str, cells: list[Cell], entry: EntryFiles, suite, images):
    """One cell group's stored perturbation if it holds every check, else None (the first problem
    found goes to `claims`)."""
    rec = cells[0].record
    n = len(images) if images is not None else sum(len(c.record.image_names) for c in cells
                                                   if c.record.prompt_key == rec.prompt_key)
    delta = _load_group_delta(claims, eps, rec, entry, (n, 3, suite.image_size, suite.image_size))
    if delta is None:
        return None
    levels = _norm_levels(claims, eps, rec, delta)
    if levels is None or not _max_norms_hold(claims, eps, cells, levels, n, delta[0].numel()):
        return None
    problem = _pixel_problem(eps, rec, delta, images) if images is not None else None
    if problem:
        claims.problems.append(problem)
        return None
    return delta


def _load_group_delta(claims: Claims, eps: str, rec: Record, entry: EntryFiles, shape: tuple):
    """The group's perturbation file, of the suite's shape and with the records' hash; None (and the
    problem) where it is not."""
    try:
        delta, _meta = load_delta(entry.folder / rec.perturbation_file, shape, name=rec.perturbation_file)
    except RecordError as exc:
        claims.problems.append(f"eps {eps}: {exc}")
        return None
    if delta_sha256(delta) != rec.perturbation_sha256:
        claims.problems.append(f"eps {eps}: {rec.perturbation_file} does not match the records' "
                               "perturbation_sha256")
        return None
    return delta


def _norm_levels(claims: Claims, eps: str, rec: Record, delta):
    """Each image's norm of the perturbation, in 8-bit levels; None (and the problem) where one is
    over the budget (linf: whole levels; l2: a rounding slack of 1e-6)."""
    budget = Budget(rec.norm, rec.eps)
    d = delta.to(torch.float64)
    if budget.norm == "linf":
        levels = d.flatten(1).abs().amax(1)
        over = levels > round(budget.eps * 255)
    else:
        levels = d.flatten(1).norm(dim=1)
        over = levels > budget.eps * 255 + 255e-6
    if bool(over.any()):
        i = int(levels.argmax())
        claims.problems.append(f"eps {eps}: image {i} of {rec.perturbation_file} has {rec.norm} norm "
                               f"{float(levels[i]):.2f}/255, over the budget {eps}")
        return None
    return levels


def _max_norms_hold(claims: Claims, eps: str, cells: list[Cell], levels, n: int, values_per_image: int) -> bool:
    """Each split's records state the largest norm over that split's images (its own rows); the first
    record that does not is the problem. False where the split itself cannot be drawn."""
    rec = cells[0].record
    try:
        train, test = split_indices(n, rec.split_seed)
    except SpdbenchError as exc:
        claims.problems.append(f"eps {eps}: {exc}")
        return False
    rows = {"train": train, "test": test}
    for c in cells:
        claimed = c.record.validation.max_norm_applied
        applied = float(levels[rows[c.record.split.value]].max()) / 255
        tol = applied_norm_tolerance(c.record.norm, applied, values_per_image)
        if claimed is not None and not abs(claimed - applied) <= tol:
            claims.problems.append(f"{c.rel}: validation.max_norm_applied {claimed!r} but the stored "
                                   f"perturbation's largest norm over its split is {applied:.6g}")
            break
    return True


def _pixel_problem(eps: str, rec: Record, delta, images) -> Optional[str]:
    """With the clean images: x + delta stays on [0, 255], and a universal claim is one delta."""
    x = (images.detach().cpu().double() * 255).round()
    adv = x + delta.to(torch.float64)
    if bool(((adv < 0) | (adv > 255)).any()):
        return f"eps {eps}: {rec.perturbation_file} takes pixels outside [0, 255]"
    if rec.universal:
        problem = universal_problem(delta, x)
        if problem:
            return f"eps {eps}: claims universal, but {problem}"
    return None


def check_networks(claims: Claims, entry: EntryFiles) -> dict:
    """Load each amortized cell group's network file and hold it against the records: the hash, the
    attack that fit it, its config = the records' attack_params, its size (within the installed
    attack's cap when it is installed), finite weights. Returns {eps label: weights}; problems go
    to `claims`. Reading runs no code: the weights are tensors, the config JSON."""
    nets = {}
    for eps, cells in claims.groups().items():
        rec = cells[0].record
        if not rec.amortized:
            continue
        info = rec.network
        try:
            state, meta = load_network(entry.folder / info["file"], info["sha256"])
        except RecordError as exc:
            claims.problems.append(f"eps {eps}: {exc}")
            continue
        values = sum(int(v.numel()) for v in state.values())
        problem = None
        if meta["attack"] != rec.attack:
            problem = f"was fit by {meta['attack']!r}, the records name {rec.attack!r}"
        elif _canon(meta["config"]) != _canon(rec.attack_params):
            problem = f"holds config {_short(meta['config'])}, the records' attack_params are {_short(rec.attack_params)}"
        elif values != info["values"] or entry.files[info["file"]].size != info["bytes"]:
            problem = (f"holds {values} values in {entry.files[info['file']].size} bytes, the records claim "
                       f"{info['values']} in {info['bytes']}")
        elif values > _network_cap(rec.attack):
            problem = f"holds {values:,} values, over attack {rec.attack!r}'s cap of {_network_cap(rec.attack):,}"
        elif not all(bool(torch.isfinite(v).all()) for v in state.values()):
            problem = "holds NaN or Inf weights"
        if problem:
            claims.problems.append(f"eps {eps}: network file {info['file']} {problem}")
            continue
        nets[eps] = state
    return nets


def _network_cap(attack: str) -> int:
    try:
        return int(installed_attack(attack).max_network_params or MAX_VALUES)
    except SpdbenchError:
        return MAX_VALUES


def universal_problem(delta255, x255) -> Optional[str]:
    """Why the stored per-image deltas are not one delta u, or None.

    The harness applies u as clamp(x + u, 0, 255) - x, so wherever no image is clamped every image's
    delta equals u, and a clamped image only bounds u (delta = -x means u <= -x; delta = 255 - x
    means u >= 255 - x). Per pixel position, the interval [lo, hi] that u must lie in is computed
    over all images. Allowed: an empty interval by one level at no more than 1% of positions
    (rounding ties when a float u is quantized image by image); refused: anything else.
    """
    d = delta255.to(torch.float64)
    low, high = -x255, 255 - x255
    interior = (d > low) & (d < high)
    inf = torch.full_like(d, math.inf)
    lo = torch.where(d == high, high, torch.where(interior, d, -inf)).amax(0)
    hi = torch.where(d == low, low, torch.where(interior, d, inf)).amin(0)
    gap = lo - hi
    worst = float(gap.max()) if gap.numel() else 0.0
    ties = float((gap > 0).double().mean()) if gap.numel() else 0.0
    if worst > 1 or ties > UNIVERSAL_TIE_FRACTION:
        return (f"its images' deltas are not one delta: at {ties:.1%} of pixel positions they differ "
                f"(by up to {worst:.0f} levels) where no image is clamped")
    return None


from spdbench.images import image_sha256  # noqa: E402,F401 - one owner of the image hash (re-exported)


def image_problems(claims: Claims, images, names: list[str], suite) -> list[str]:
    """Each split's records name the suite's images of that split, with their hashes and edit seeds."""
    train, test = split_indices(len(images), suite.split_seed)
    settings = EditSettings(**suite.edit.to_dict())
    shas = [image_sha256(images[i]) for i in range(len(images))]
    out = []
    for split, idx in (("train", train), ("test", test)):
        cells = [c for c in claims.ok_cells if c.record.split.value == split]
        if not cells:
            continue
        rec = cells[0].record
        if rec.image_names != [names[i] for i in idx]:
            out.append(f"{cells[0].rel}: {split} images {rec.image_names[:4]}... are not suite {suite.name!r}'s "
                       f"{split} split {[names[i] for i in idx][:4]}...")
        elif rec.image_sha256 != [shas[i] for i in idx]:
            out.append(f"{cells[0].rel}: the {split} images' sha256 differ from the suite's images")
        elif rec.edit_seeds != [image_seed(settings, images[i]) for i in idx]:
            out.append(f"{cells[0].rel}: edit_seeds are not the suite's per-image seeds")
    out += mask_problems(claims, images, names, suite)
    return out


def mask_problems(claims: Claims, images, names: list[str], suite) -> list[str]:
    """Every record has the suite's task; an inpainting record names the suite's mask of each of its
    photos (by hash), an img2img record none -- a forged or swapped mask is refused here."""
    out = []
    want = None
    if suite.masks:
        masks = mask_set(suite.masks, names, images.shape[-1])
        want = [mask_sha256(m) for m in masks]
    train, test = split_indices(len(images), suite.split_seed)
    for c in claims.ok_cells:
        rec = c.record
        if rec.task != suite.task:
            out.append(f"{c.rel}: task {rec.task!r}, suite {suite.name!r} is {suite.task!r}")
            continue
        idx = train if rec.split.value == "train" else test
        if want is None:
            if rec.masks is not None:
                out.append(f"{c.rel}: names masks, but suite {suite.name!r} edits without masks")
            continue
        got = (rec.masks or {}).get("sha256")
        if got != [want[i] for i in idx]:
            out.append(f"{c.rel}: the masks' sha256 are not suite {suite.name!r}'s {suite.masks!r} masks of its photos")
    return out


def _mark_digest_flags(checked: Claims, marks: dict[str, str]) -> None:
    """Records that are not signed by this machine carry the flag ("unsigned", ...) on the board."""
    for c in checked.cells:
        flag = marks.get(c.rel)
        if flag and flag not in c.record.flags:
            c.record.flags.append(flag)


def load_checked(dirs: Sequence[Union[str, Path]]) -> tuple[list[Record], list[tuple[str, str]]]:
    """The records of every folder that passes its checks (see load_checked_by_folder), flat."""
    by_folder, skipped = load_checked_by_folder(dirs)
    return [r for recs in by_folder.values() for r in recs], skipped


def load_checked_by_folder(dirs: Sequence[Union[str, Path]]) -> tuple[dict[str, list[Record]],
                                                                       list[tuple[str, str]]]:
    """The records of every folder that passes its checks, and (folder name, reason) for the others.
    Here, with the checks, because the leaderboard build, `compare` and `submit` all read folders so.

    A leaderboard entry (a folder with a manifest) gets the full claim checks of `verify` except
    re-measurement; a local run folder the lighter ones (failed cells and partial grids allowed).
    Either way the numbers the build derives are well defined: whole per-image lists, finite values,
    safe names, one record per cell. Hidden folders (a submit in progress) are not entries.
    """
    records: dict[str, list[Record]] = {}
    skipped: list[tuple[str, str]] = []
    owners: dict[tuple, str] = {}  # method key -> the folder that holds it
    for d in dirs:
        d = Path(d)
        if d.name.startswith("."):
            continue
        try:
            entry = scan(d)
        except RecordError as exc:
            skipped.append((d.name, str(exc)))
            continue
        refused, marks = digest_verdict(entry)  # a record rewritten after its run: left out, named
        checked = check(entry, strict=entry.is_entry)
        if refused or checked.problems:
            skipped.append((d.name, refused or checked.problems[0]))
            continue
        _mark_digest_flags(checked, marks)
        keys = {method_key(r) for r in checked.records}
        taken = sorted({owners[k] for k in keys if k in owners})
        if taken:
            skipped.append((d.name, f"holds the same method and suite as {taken[0]} (one folder per row)"))
            continue
        owners.update({k: d.name for k in keys})
        records[str(d)] = checked.records
    return records, skipped

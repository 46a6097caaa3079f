"""verify's re-run says when its own worker could not be sandboxed (issue 40): never silently ok."""
from types import SimpleNamespace

from spdbench.verify.remeasure import Measured, _note_rerun_isolation


def _rec(isolation, reason=None):
    return SimpleNamespace(isolation=isolation, isolation_detail={"reason": reason} if reason else None)


def test_an_unsandboxed_rerun_is_reported_with_its_reason():
    out = Measured()
    result = SimpleNamespace(records=[_rec("process", "Landlock is not available (kernel 5.4)"), _rec("process",
                                      "Landlock is not available (kernel 5.4)")])
    _note_rerun_isolation(SimpleNamespace(eps_label="8/255"), result, out)
    assert len(out.unconfined) == 1 and "NOT sandboxed" in out.unconfined[0] and "kernel 5.4" in out.unconfined[0]
    assert not out.notes and not out.problems  # the perturbation check's wording is unaffected


def test_a_sandboxed_rerun_adds_nothing():
    out = Measured()
    _note_rerun_isolation(SimpleNamespace(eps_label="8/255"), SimpleNamespace(records=[_rec("sandbox")]), out)
    assert out.unconfined == []

"""The Ray backend writes the same records as the serial one (local Ray, CPU)."""
import pytest

from spdbench.harness.grid import grid, run_grid

from harness_helpers import fast_images, fast_suite


def test_grid_is_attack_by_eps():
    tasks = grid(["none", "uniform-noise"], ["4/255", "8/255"])
    assert [(t.attack, t.eps) for t in tasks] == [("none", "4/255"), ("none", "8/255"),
                                                  ("uniform-noise", "4/255"), ("uniform-noise", "8/255")]


@pytest.mark.slow
def test_ray_backend_matches_serial(tmp_path):
    kw = dict(target="tiny-random", images=fast_images(4))
    suite = fast_suite()
    # one attack at two budgets: two tasks on two Ray workers (every task is a whole run: worker,
    # sandbox, edits), which is what the backend distributes; a second attack only doubled the time
    serial = run_grid(["uniform-noise"], suite, ["8/255", "16/255"], tmp_path / "serial", **kw)
    ray_recs = run_grid(["uniform-noise"], suite, ["8/255", "16/255"], tmp_path / "ray", backend="ray", **kw)
    a = {r.cell_id: r for r in serial}
    b = {r.cell_id: r for r in ray_recs}
    assert len(a) == 4 and a.keys() == b.keys()
    for cid in a:
        assert a[cid].protection == b[cid].protection, cid
        assert a[cid].perturbation_sha256 == b[cid].perturbation_sha256

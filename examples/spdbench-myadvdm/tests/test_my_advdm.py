import pytest

from spdbench_myadvdm import MyAdvDM


@pytest.mark.spdbench(eps=["16/255"])
def test_my_advdm_protects(spdbench_check):
    spdbench_check(MyAdvDM)  # in budget, deterministic, non-zero, beats uniform noise on both splits

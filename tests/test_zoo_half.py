"""`--photo-half`: the two halves of the list's train split (sibling models such as tiny-b).

Fast and offline: uses the list's records only, never the fetched photos.
"""
from __future__ import annotations

import pytest

from spdbench.errors import InputError
from zoo import photos as zp
from zoo import train_tiny


@pytest.fixture(scope="module")
def train() -> list:
    return [e for e in zp.load_list()["photos"] if e["split"] == "train"]


def test_halves_are_disjoint_and_cover_the_train_split(train):
    a, b = zp.select_half(train, "a"), zp.select_half(train, "b")
    names_a, names_b = {e["name"] for e in a}, {e["name"] for e in b}
    assert not names_a & names_b
    assert names_a | names_b == {e["name"] for e in train}
    assert len(a) + len(b) == len(train)
    assert min(len(a), len(b)) >= 0.4 * len(train)  # roughly even (real list: 157 / 151)
    assert zp.select_half(train, None) == train


def test_halves_are_stable(train):
    a = [e["name"] for e in zp.select_half(train, "a")]
    # the same photos whatever the list's order, and whatever else is in it
    assert sorted(e["name"] for e in zp.select_half(list(reversed(train)), "a")) == sorted(a)
    assert [e["name"] for e in zp.select_half(train[::2], "a")] == [n for n in a if n in {e["name"] for e in train[::2]}]
    # the rule itself is fixed: a recorded hash keeps its half across releases
    assert zp.half_of("0" * 64) == "a" and zp.half_of("7" + "f" * 63) == "a"
    assert zp.half_of("8" + "0" * 63) == "b" and zp.half_of("f" * 64) == "b"


def test_half_errors():
    with pytest.raises(InputError, match="photo-half"):
        zp.select_half([], "c")
    with pytest.raises(InputError, match="sha256"):
        zp.half_of("abc")
    with pytest.raises(InputError, match="needs --data list"):
        train_tiny.training_photos("bundled", half="a")


def test_record_photos_keep_the_half(monkeypatch):
    """Later stages (decoder refinement, --check-steps) must reload the half the model saw."""
    seen = {}

    def fake(data, photos_dir=None, data_list=None, half=None):
        seen.update(data=data, half=half)
        return []

    monkeypatch.setattr(train_tiny, "training_photos", fake)
    train_tiny.record_photos({"settings": {"data": "list", "photo_half": "b"}}, None)
    assert seen == dict(data="list", half="b")
    train_tiny.record_photos({"settings": {"data": "list"}}, None)  # records before --photo-half
    assert seen == dict(data="list", half=None)

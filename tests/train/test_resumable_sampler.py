"""The data stream resumes at any position: position p is a pure function of (seed, p)."""

import pytest

from grace.train.sampler import ResumableSampler, build_dataset


def take(sampler, n):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_epochs_are_permutations_and_resume_anywhere():
    first = take(ResumableSampler(5, seed=1), 12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert first[:5] != first[5:10]                       # each epoch its own order
    assert take(ResumableSampler(5, seed=1, start=7), 5) == first[7:12]
    assert take(ResumableSampler(5, seed=2), 5) != first[:5]


def test_endless_stream_counts_up_from_the_start():
    assert take(ResumableSampler(None, seed=1, start=3), 2) == [3, 4]


def test_dataset_names(tmp_path):
    assert type(build_dataset("shapes", 0, 64)).__name__ == "ShapesStream"
    with pytest.raises(ValueError, match="'shapes' or an existing conversation .json"):
        build_dataset(str(tmp_path / "missing.json"), 0, 64)

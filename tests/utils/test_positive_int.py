import pytest

from posthoc.utils.checks import check_positive_int


@pytest.mark.parametrize("bad", [0, -3, 1.0, True, "2", None])
def test_refuses_non_positive_ints(bad):
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        check_positive_int(bad, "n_steps")


def test_accepts_positive_ints_and_optional_none():
    assert check_positive_int(3, "k") == 3
    assert check_positive_int(None, "k", allow_none=True) is None
    with pytest.raises(ValueError, match=r"k must be a positive int or None \(the rank\), got 0"):
        check_positive_int(0, "k", "the rank", allow_none=True)

import pytest

from posthoc.utils.checks import check_int, check_positive_int


@pytest.mark.parametrize("bad", [0, -3, 1.0, True, "2", None])
def test_refuses_non_positive_ints(bad):
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        check_positive_int(bad, "n_steps")


def test_accepts_positive_ints_and_optional_none():
    assert check_positive_int(3, "k") == 3
    assert check_positive_int(None, "k", allow_none=True) is None
    with pytest.raises(ValueError, match=r"k must be a positive int or None \(the rank\), got 0"):
        check_positive_int(0, "k", "the rank", allow_none=True)


def test_check_int_takes_any_sign_and_refuses_other_types():
    assert check_int(-100, "ignore_index") == -100 and check_int(255, "ignore_index") == 255
    for bad in (-100.0, True, "1", None):
        with pytest.raises(TypeError, match=r"ignore_index must be an int \(a class index\), got"):
            check_int(bad, "ignore_index", "a class index")

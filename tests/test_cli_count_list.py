"""cli.common.parse_count_list: the one parser of --lw, --clients and --replicas."""

import pytest

from splitcli.cli.common import parse_count_list
from splitcli.errors import SplitLLMError


def test_counts_are_deduplicated_sorted_and_empty_items_skipped():
    assert parse_count_list("8,1, 4,8,", "--clients", 1, 64) == [1, 4, 8]
    assert parse_count_list("0", "--lw", 0) == [0]
    assert parse_count_list("1,16", "--replicas", 1, 16) == [1, 16]


@pytest.mark.parametrize("text, pattern", [
    ("1,x", "--clients must be comma-separated integers like 4,8,16, got '1,x'"),
    (",,", "--clients must be comma-separated integers like 4,8,16, got ',,'"),
    ("", "--clients must be comma-separated integers"),
    ("0,2", r"--clients needs values in 1\.\.64, got '0,2'"),
    ("2,65", r"--clients needs values in 1\.\.64, got '2,65'"),
])
def test_bad_lists_are_one_line_errors(text, pattern):
    with pytest.raises(SplitLLMError, match=pattern):
        parse_count_list(text, "--clients", 1, 64)


def test_no_upper_bound():
    assert parse_count_list("0,1000", "--lw", 0) == [0, 1000]
    with pytest.raises(SplitLLMError, match="--lw needs values >= 0, got '-1,2'"):
        parse_count_list("-1,2", "--lw", 0)

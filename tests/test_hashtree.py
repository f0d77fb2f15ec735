import pytest
from hypothesis import given
from hypothesis import strategies as st

from lafs_core.hashes import block_hash, empty_leaf_hash, merkle_pair_hash
from lafs_core.hashtree import (
    BadHashError,
    HashTree,
    IncompleteHashTree,
    NotEnoughHashesError,
    needed_hash_set,
    roundup_pow2,
)


def leaves(n):
    return [block_hash(b"%d" % i) for i in range(n)]


def test_small_tree_by_hand():
    a, b, c = leaves(3)
    tree = HashTree([a, b, c])
    pad = empty_leaf_hash(3)
    assert list(tree) == [
        merkle_pair_hash(merkle_pair_hash(a, b), merkle_pair_hash(c, pad)),
        merkle_pair_hash(a, b),
        merkle_pair_hash(c, pad),
        a,
        b,
        c,
        pad,
    ]


def test_single_leaf_tree_is_the_leaf():
    (a,) = leaves(1)
    assert list(HashTree([a])) == [a]


def test_needed_hashes_in_tahoe_set_order():
    # From the spec: N=256, share 0 writes its chain in CPython set order, not sorted.
    assert list(needed_hash_set(256, 0, include_leaf=True)) == [256, 32, 64, 128, 4, 2, 8, 16, 255]


@given(st.integers(min_value=1, max_value=300), st.data())
def test_every_leaf_validates_from_its_chain(num_leaves, data):
    tree = HashTree(leaves(num_leaves))
    leafnum = data.draw(st.integers(min_value=0, max_value=num_leaves - 1))
    partial = IncompleteHashTree(num_leaves)
    partial.set_hashes({0: tree[0]})
    needed = partial.needed_hashes(leafnum)
    assert needed == tree.needed_hashes(leafnum)
    partial.set_hashes({i: tree[i] for i in needed}, leaves={leafnum: tree[tree.first_leaf_num + leafnum]})
    assert partial[partial.first_leaf_num + leafnum] == tree[tree.first_leaf_num + leafnum]
    assert partial.needed_hashes(leafnum) == set()


@given(st.integers(min_value=2, max_value=64), st.data())
def test_any_wrong_hash_is_rejected_and_nothing_is_kept(num_leaves, data):
    tree = HashTree(leaves(num_leaves))
    leafnum = data.draw(st.integers(min_value=0, max_value=num_leaves - 1))
    partial = IncompleteHashTree(num_leaves)
    partial.set_hashes({0: tree[0]})
    chain = {i: tree[i] for i in partial.needed_hashes(leafnum)}
    leaf = tree[tree.first_leaf_num + leafnum]
    victim = data.draw(st.sampled_from([*sorted(chain), "leaf"]))
    if victim == "leaf":
        leaf = bytes(32)
    else:
        chain[victim] = bytes(32)
    with pytest.raises(BadHashError):
        partial.set_hashes(chain, leaves={leafnum: leaf})
    assert all(partial[i] is None for i in range(1, len(partial)))


def test_missing_sibling_is_not_enough():
    tree = HashTree(leaves(8))
    partial = IncompleteHashTree(8)
    partial.set_hashes({0: tree[0]})
    chain = {i: tree[i] for i in partial.needed_hashes(5)}
    chain.pop(min(chain))
    with pytest.raises(NotEnoughHashesError):
        partial.set_hashes(chain, leaves={5: tree[tree.first_leaf_num + 5]})


def test_no_root_means_nothing_can_be_trusted():
    tree = HashTree(leaves(4))
    partial = IncompleteHashTree(4)
    with pytest.raises(NotEnoughHashesError):
        partial.set_hashes({i: tree[i] for i in range(1, len(tree))})


def test_conflict_with_known_hash():
    tree = HashTree(leaves(4))
    partial = IncompleteHashTree(4)
    partial.set_hashes({0: tree[0]})
    with pytest.raises(BadHashError):
        partial.set_hashes({0: bytes(32)})


def test_roundup():
    assert [roundup_pow2(x) for x in (0, 1, 2, 3, 4, 5, 255, 256, 257)] == [1, 1, 2, 4, 4, 8, 256, 256, 512]

"""Tahoe's Merkle hash tree (`src/allmydata/hashtree.py`): complete binary tree stored breadth-first.

Node n has children 2n+1 and 2n+2; the leaf row is padded to a power of two with `empty_leaf_hash(i)`, where
i is the position in the padded row. `HashTree` builds a whole tree from its leaves (the writer's side);
`IncompleteHashTree` starts from a trusted root and accepts only hashes it can chain to it (the reader's side).
"""

import heapq

from .errors import LafsError
from .hashes import empty_leaf_hash, merkle_pair_hash


class BadHashError(LafsError):
    """A hash does not chain to the trusted root."""


class NotEnoughHashesError(LafsError):
    """Some hash cannot be checked because a sibling or ancestor is missing."""


def roundup_pow2(x: int) -> int:
    result = 1
    while result < x:
        result *= 2
    return result


def tree_size(num_leaves: int) -> int:
    """Number of nodes of the tree over `num_leaves` leaves (after padding)."""
    return 2 * roundup_pow2(num_leaves) - 1


def sibling(i: int) -> int:
    return i + 1 if i % 2 else i - 1


def parent(i: int) -> int:
    return (i - 1) // 2


def chain_indices(node: int) -> list[int]:
    """Sibling of `node`, then of its parent, and so on up to the root's children."""
    needed = []
    while node:
        needed.append(sibling(node))
        node = parent(node)
    return needed


def needed_hash_set(num_leaves: int, leafnum: int, include_leaf: bool = False) -> set[int]:
    """The node indices needed to check leaf `leafnum` against the root, the root excluded.

    Returned as a set built in the same insertion order as Tahoe's, because writers serialize it in set
    iteration order and byte-identical shares depend on that order.
    """
    leaf = roundup_pow2(num_leaves) - 1 + leafnum
    needed = set(chain_indices(leaf))
    if include_leaf:
        needed.add(leaf)
    return needed


class HashTree(list[bytes]):
    """A complete tree computed from its leaves; `self[0]` is the root."""

    def __init__(self, leaves: list[bytes]) -> None:
        width = roundup_pow2(len(leaves))
        row = list(leaves) + [empty_leaf_hash(i) for i in range(len(leaves), width)]
        rows = [row]
        while len(row) > 1:
            row = [merkle_pair_hash(row[2 * i], row[2 * i + 1]) for i in range(len(row) // 2)]
            rows.append(row)
        super().__init__(h for r in reversed(rows) for h in r)
        self.first_leaf_num = width - 1
        self.num_leaves = len(leaves)

    def needed_hashes(self, leafnum: int, include_leaf: bool = False) -> set[int]:
        return needed_hash_set(self.num_leaves, leafnum, include_leaf)


class IncompleteHashTree:
    """A partially known tree that validates every hash it is given against what it already trusts.

    Set the root from a trusted source first; afterwards `set_hashes` either accepts a batch that chains to
    trusted nodes (and remembers it) or raises and remembers nothing.
    """

    def __init__(self, num_leaves: int) -> None:
        width = roundup_pow2(num_leaves)
        self.num_leaves = num_leaves
        self.first_leaf_num = width - 1
        self._nodes: list[bytes | None] = [None] * (2 * width - 1)

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, index: int) -> bytes | None:
        return self._nodes[index]

    def leaf_index(self, leafnum: int) -> int:
        if not 0 <= leafnum < self.num_leaves:
            raise IndexError(f"leaf {leafnum} out of range 0..{self.num_leaves - 1}")
        return self.first_leaf_num + leafnum

    def needed_hashes(self, leafnum: int, include_leaf: bool = False) -> set[int]:
        """Node indices still unknown that checking leaf `leafnum` requires."""
        leaf = self.leaf_index(leafnum)
        wanted = chain_indices(leaf) + ([leaf] if include_leaf else [])
        return {i for i in wanted if self._nodes[i] is None}

    def set_hashes(self, hashes: dict[int, bytes] | None = None, leaves: dict[int, bytes] | None = None) -> None:
        """Add hashes (by node index) and leaves (by leaf number) after checking them all against the root."""
        new = dict(hashes or {})
        for leafnum, value in (leaves or {}).items():
            index = self.leaf_index(leafnum)
            if new.setdefault(index, value) != value:
                raise BadHashError(f"conflicting values given for leaf {leafnum}")
        size = len(self._nodes)
        pending: dict[int, bytes] = {}
        for index, value in new.items():
            if not 0 <= index < size:
                raise BadHashError(f"hash index {index} outside a tree of {size} nodes")
            known = self._nodes[index]
            if known is None:
                pending[index] = value
            elif known != value:
                raise BadHashError(f"hash {index} differs from the one already validated")

        def value_of(i: int) -> bytes | None:
            known = self._nodes[i]
            return known if known is not None else pending.get(i)

        heap = [-i for i in pending if i]
        heapq.heapify(heap)
        checked: set[int] = set()
        while heap:
            index = -heapq.heappop(heap)
            up = parent(index)
            if up in checked and index in checked:
                continue
            left, right = (index, index + 1) if index % 2 else (index - 1, index)
            lval, rval = value_of(left), value_of(right)
            if lval is None or rval is None:
                raise NotEnoughHashesError(f"hash {sibling(index)} is needed to check hash {index}")
            computed = merkle_pair_hash(lval, rval)
            checked.update((left, right))
            existing = value_of(up)
            if existing is None:
                pending[up] = computed
                if up:
                    heapq.heappush(heap, -up)
            elif existing != computed:
                raise BadHashError(f"hashes {left} and {right} do not hash to node {up}")
        if 0 in pending and 0 not in new:
            raise NotEnoughHashesError("no trusted root to check these hashes against")
        for index, value in pending.items():
            self._nodes[index] = value

"""Pure-Python twin of `cai_fast._core.BlockPool` and `cai_fast._core.RadixCache`.

The readable reference and the fallback: same API, same semantics, same allocation order, same
eviction order and the same error messages as the C++ (tests drive both side by side). See
`cai_fast.scheduler` for the contract.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

FREE, PRIVATE, CACHED = 0, 1, 2


class BlockPool:
    """KV block ids [0, num_blocks): Free, Private (from alloc) or Cached (owned by a tree node).

    Free ids form a stack (0 on top at first): alloc pops, free pushes, so ids are reused LIFO.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if not 1 <= num_blocks <= 2**31 - 1:
            raise ValueError(f"BlockPool: num_blocks={num_blocks} must be in [1, 2**31 - 1]")
        if block_size < 1:
            raise ValueError(f"BlockPool: block_size={block_size} must be at least 1 token")
        self._block_size = block_size
        self._state = [FREE] * num_blocks
        self._free_stack = list(range(num_blocks - 1, -1, -1))

    num_free = property(lambda self: len(self._free_stack))
    num_blocks = property(lambda self: len(self._state))
    block_size = property(lambda self: self._block_size)

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, block_size={self.block_size}, num_free={self.num_free})"

    def in_range(self, block: int) -> bool:
        return 0 <= block < len(self._state)

    def state(self, block: int) -> int:
        return self._state[block]

    def alloc(self, n: int) -> list[int]:
        """Take n free block ids; RuntimeError if fewer than n are free."""
        if n < 0:
            raise ValueError(f"alloc: asked for {n} blocks")
        if n > self.num_free:
            raise RuntimeError(f"alloc: asked for {n} blocks, {self.num_free} free of {self.num_blocks};"
                               " evict or raise the pool size")
        ids = [self._free_stack.pop() for _ in range(n)]
        for block in ids:
            self._state[block] = PRIVATE
        return ids

    def free(self, ids: Iterable[int]) -> None:
        """Return blocks from alloc; ValueError (freeing nothing) on a bad id."""
        ids = list(ids)
        self._check_freeable(ids)
        for block in ids:
            self._state[block] = FREE
            self._free_stack.append(block)

    def _check_freeable(self, ids: list[int]) -> None:
        seen = set()
        for block in ids:
            name = f"free: block {block}"
            if not self.in_range(block):
                raise ValueError(f"{name} is out of range [0, {self.num_blocks})")
            if self._state[block] == FREE:
                raise ValueError(f"{name} is already free (double free)")
            if self._state[block] == CACHED:
                raise ValueError(f"{name} is owned by the prefix cache; only evict frees it")
            if block in seen:
                raise ValueError(f"{name} appears twice in the ids to free")
            seen.add(block)

    def mark_cached(self, block: int) -> None:
        self._state[block] = CACHED

    def release_cached(self, block: int) -> None:
        self._state[block] = FREE
        self._free_stack.append(block)

    def check_integrity(self) -> int:
        """Raise RuntimeError on a broken invariant; return the number of Cached blocks."""
        on_stack = set()
        for block in self._free_stack:
            if not self.in_range(block) or self._state[block] != FREE or block in on_stack:
                raise RuntimeError(f"block pool integrity: free list entry {block} is out of range,"
                                   " not free, or listed twice")
            on_stack.add(block)
        free_count = self._state.count(FREE)
        if free_count != self.num_free:
            raise RuntimeError(f"block pool integrity: {free_count} blocks are free but the free list"
                               f" holds {self.num_free}")
        return self._state.count(CACHED)


@dataclass(eq=False)
class Node:
    id: int
    parent: Optional["Node"]
    key: list[int]  # token ids, a multiple of block_size
    blocks: list[int]  # len(key) // block_size block ids
    children: dict[tuple, "Node"] = field(default_factory=dict)  # by first block's tokens
    lock_ref: int = 0
    last_access: int = 0


@dataclass(frozen=True)
class MatchResult:
    length: int  # matched tokens, a multiple of block_size
    blocks: list[int]  # block ids covering the matched tokens
    node: int  # handle of the node where the match ends (lock it)


def _broken(what: str) -> RuntimeError:
    return RuntimeError(f"radix cache integrity: {what}")


class RadixCache:
    """Radix tree over token ids whose nodes own KV blocks of `pool` (whole blocks only)."""

    def __init__(self, pool: BlockPool):
        if pool is None:
            raise ValueError("RadixCache: pool is None; pass a BlockPool")
        self.pool = pool
        self.block_size = pool.block_size
        self._next_id = 0
        self._clock = 0
        self._sizes = [0, 0]  # tokens in unlocked nodes, tokens in locked nodes
        self._nodes: dict[int, Node] = {}
        self.root = self._make_node(None, [], [])

    evictable_size = property(lambda self: self._sizes[0])
    protected_size = property(lambda self: self._sizes[1])
    total_size = property(lambda self: self._sizes[0] + self._sizes[1])

    def _make_node(self, parent: Optional[Node], key: list[int], blocks: list[int]) -> Node:
        node = Node(self._next_id, parent, key, blocks, last_access=self._clock)
        self._next_id += 1
        self._nodes[node.id] = node
        if parent is not None:
            parent.children[tuple(key[: self.block_size])] = node
        return node

    def find(self, node: int, caller: str) -> Node:
        found = self._nodes.get(node)
        if found is None:
            raise ValueError(f"{caller}: node {node} is not in the cache (evicted, or never returned by"
                             " match_prefix); lock a node right after match_prefix")
        return found

    def _common_blocks_len(self, node: Node, tokens: Sequence[int], pos: int) -> int:
        key = node.key
        if tokens[pos : pos + len(key)] == key:
            same = len(key)
        else:
            limit = min(len(key), len(tokens) - pos)
            same = next((i for i in range(limit) if key[i] != tokens[pos + i]), limit)
        return same // self.block_size * self.block_size

    def _descend(self, tokens: list[int], mutate: bool, blocks: Optional[list[int]] = None) -> tuple[Node, int]:
        """Follow the whole blocks of `tokens` from the root; with `mutate`, stamp each node passed
        and split the node where the match ends mid-edge. Returns (deepest full node, length)."""
        node, pos, bs = self.root, 0, self.block_size
        while pos + bs <= len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + bs]))
            if child is None:
                break
            length = self._common_blocks_len(child, tokens, pos)
            if blocks is not None:
                blocks.extend(child.blocks[: length // bs])
            pos += length
            partial = length < len(child.key)
            if mutate:
                child.last_access = self._clock
            if partial and mutate:
                node = self._split(child, length)
            if partial:
                break
            node = child
        return node, pos

    def _split(self, child: Node, length: int) -> Node:
        """Cut `child` after `length` tokens: a new node takes the upper part and child's place;
        `child` keeps the lower part and its handle. Locks and sizes are unchanged."""
        nblocks = length // self.block_size
        upper = self._make_node(child.parent, child.key[:length], child.blocks[:nblocks])
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        child.key, child.blocks = child.key[length:], child.blocks[nblocks:]
        child.parent = upper
        upper.children[tuple(child.key[: self.block_size])] = child
        return upper

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `tokens` in whole blocks; splits the node it ends inside."""
        self._clock += 1
        whole = list(tokens[: len(tokens) // self.block_size * self.block_size])
        blocks: list[int] = []
        node, length = self._descend(whole, True, blocks)
        return MatchResult(length, blocks, node.id)

    def _check_new_blocks(self, blocks: Sequence[int], first: int) -> None:
        seen = set()
        for block in blocks[first:]:
            name = f"insert: block {block}"
            if not self.pool.in_range(block):
                raise ValueError(f"{name} is out of range [0, {self.pool.num_blocks})")
            if self.pool.state(block) == FREE:
                raise ValueError(f"{name} is free; insert blocks from alloc that hold these tokens' KV")
            if self.pool.state(block) == CACHED:
                raise ValueError(f"{name} is already owned by the prefix cache")
            if block in seen:
                raise ValueError(f"{name} appears twice in the ids to insert")
            seen.add(block)

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the whole blocks of `tokens` with KV in `blocks` (one id per whole block).

        Returns how many tokens were already cached: the tree keeps its own blocks for those and
        takes ownership of blocks[already // block_size:]; the caller frees its duplicates."""
        nblocks = len(tokens) // self.block_size
        n = nblocks * self.block_size
        if len(blocks) != nblocks:
            raise ValueError(f"insert: {len(tokens)} tokens make {nblocks} whole blocks of {self.block_size}"
                             f" but {len(blocks)} block ids were given; pass one id per whole block (a"
                             " trailing partial block is not cached)")
        whole = list(tokens[:n])
        cached = self._descend(whole, False)[1]
        self._check_new_blocks(blocks, cached // self.block_size)
        self._clock += 1
        node, cached = self._descend(whole, True)
        if cached < n:
            new_blocks = list(blocks[cached // self.block_size :])
            for block in new_blocks:
                self.pool.mark_cached(block)
            self._make_node(node, whole[cached:], new_blocks)
            self._sizes[0] += n - cached
        return cached

    def _evictable_leaves(self) -> list[Node]:
        return [n for n in self._nodes.values() if n is not self.root and not n.children and n.lock_ref == 0]

    def _remove_leaf(self, leaf: Node, freed: list[int]) -> None:
        for block in leaf.blocks:
            self.pool.release_cached(block)
        freed.extend(leaf.blocks)
        self._sizes[0] -= len(leaf.key)
        del leaf.parent.children[tuple(leaf.key[: self.block_size])]
        del self._nodes[leaf.id]

    def evict(self, num_tokens: int) -> list[int]:
        """Free unlocked leaves, least recently used first (ties: older node id), until at least
        `num_tokens` tokens are freed or nothing is evictable. Whole leaves go, so this may free
        more than asked. Returns the freed block ids (now back in the pool)."""
        if num_tokens < 0:
            raise ValueError(f"evict: num_tokens={num_tokens} must be >= 0")
        heap = [(n.last_access, n.id, n) for n in self._evictable_leaves()]
        heapq.heapify(heap)
        freed: list[int] = []
        freed_tokens = 0
        while freed_tokens < num_tokens and heap:
            leaf = heapq.heappop(heap)[2]
            parent = leaf.parent
            freed_tokens += len(leaf.key)
            self._remove_leaf(leaf, freed)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def lock(self, node: int) -> None:
        """Protect the path root..node from eviction (one reference count per call)."""
        n = self.find(node, "lock")
        while n is not self.root:
            if n.lock_ref == 0:
                self._sizes[0] -= len(n.key)
                self._sizes[1] += len(n.key)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: int) -> None:
        """Undo one lock(node); ValueError if node is not locked."""
        n = self.find(node, "unlock")
        if n is not self.root and n.lock_ref == 0:
            raise ValueError(f"unlock: node {node} is not locked (its lock count would go below zero)")
        while n is not self.root:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._sizes[1] -= len(n.key)
                self._sizes[0] += len(n.key)
            n = n.parent

    def _debug_set_lock_ref(self, node: int, value: int) -> None:
        """Test hook: set a lock count directly, breaking the invariants on purpose."""
        self.find(node, "_debug_set_lock_ref").lock_ref = value

    def _check_node(self, node: Node, seen: set[int], sizes: list[int]) -> int:
        name, bs = f"node {node.id}", self.block_size
        if node is not self.root and (not node.key or len(node.key) % bs):
            raise _broken(f"{name} key has {len(node.key)} tokens, not a positive multiple of block_size {bs}")
        if len(node.blocks) * bs != len(node.key):
            raise _broken(f"{name} has {len(node.blocks)} blocks for {len(node.key)} tokens")
        if node.lock_ref < 0:
            raise _broken(f"{name} has a negative lock count {node.lock_ref}")
        sizes[node.lock_ref > 0] += len(node.key)
        for block in node.blocks:
            if not self.pool.in_range(block) or self.pool.state(block) != CACHED or block in seen:
                raise _broken(f"block {block} of {name} is out of range, not marked cached, or owned twice")
            seen.add(block)
        for first, child in node.children.items():
            if child.parent is not node or first != tuple(child.key[:bs]):
                raise _broken(f"node {child.id} is filed under the wrong parent or first block")
        child_locks = sum(child.lock_ref for child in node.children.values())
        if node is not self.root and child_locks > node.lock_ref:
            raise _broken(f"{name} has lock count {node.lock_ref} below its children's total {child_locks}")
        return len(node.blocks)

    def check_integrity(self) -> None:
        """Raise RuntimeError describing the first broken invariant found, if any."""
        cached_in_pool = self.pool.check_integrity()
        seen: set[int] = set()
        sizes = [0, 0]  # evictable, protected
        blocks = count = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            if self._nodes.get(node.id) is not node:
                raise _broken(f"node {node.id} has no valid handle")
            blocks += self._check_node(node, seen, sizes)
            count += 1
            stack.extend(node.children.values())
        if count != len(self._nodes):
            raise _broken(f"{len(self._nodes)} handles but {count} nodes reachable from the root")
        if sizes != self._sizes:
            raise _broken(f"evictable/protected sizes are {self.evictable_size}/{self.protected_size} but"
                          f" the nodes add up to {sizes[0]}/{sizes[1]}")
        if blocks != cached_in_pool:
            raise _broken(f"{cached_in_pool} blocks are marked cached in the pool but the tree owns {blocks}")

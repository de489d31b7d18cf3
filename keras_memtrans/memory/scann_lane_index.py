"""The ScaNN index of one `ScannMemory` lane and when to (re)build it.

A lane is either searched exactly, by `exact_top_slots`, or through one
ScaNN searcher per head whose document ids map to ring-buffer slots
(`index_slots[id] == slot`); `delete_slots` keeps that map in step with
ScaNN's deletions. `ScannLaneIndex` holds a lane's searchers, applies the
rebuild policy after each write and (de)serialises the searchers.
"""

import os
import re
import tempfile

import numpy as np

# The names of the files a searcher serialises to (`*.npy`, `*.pb`, ...).
SEARCHER_FILE = re.compile(r"[A-Za-z0-9_]+\.(npy|pb|pbtxt)")


def min_index_entries(num_leaves):
    """Fewest entries a lane's searchers are built on (and kept for).

    The trees are trained by k-means with `num_leaves` centres: below a few
    points per leaf they fail to build (an empty lane, or fewer points than
    leaves) or partition noise, so smaller lanes are searched exactly.
    """
    return max(16, 8 * num_leaves)


def exact_top_slots(queries, keys, slots, num_neighbors):
    """Brute-force top-k among the filled `slots` of one lane.

    Args:
        queries: `[query, heads, dim]`.
        keys: the lane's keys `[heads, memory_size, dim]`.
        slots: int array of the filled slots.
        num_neighbors: int, `k`.

    Returns:
        int64 slots `[query, heads, k]`, unordered, `-1` past the filled ones.
    """
    num_queries, num_heads = queries.shape[:2]
    found = np.full((num_queries, num_heads, num_neighbors), -1, "int64")
    k = min(num_neighbors, len(slots))
    if k == 0:
        return found
    scores = np.einsum("qhd,hnd->qhn", queries, keys[:, slots])  # [query, heads, n]
    best = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    found[..., :k] = slots[best]
    return found


def delete_slots(index_slots, slots, memory_size):
    """Mirrors ScaNN's `delete` of the indexed `slots` of one lane.

    ScaNN moves its last document into a deleted id, so ids are not stable.

    Args:
        index_slots: int64 `[indexed]`, the slot of each document id.
        slots: the slots to delete; those not indexed are skipped.
        memory_size: int, the number of ring-buffer slots.

    Returns:
        `(index_slots, slot_index, deleted)`: the remaining id -> slot map,
        its inverse `[memory_size]` (`-1`: not indexed) and the ids to pass
        to `delete`, in order.
    """
    index_slots = index_slots.copy()
    slot_index = np.full((memory_size,), -1, "int64")
    slot_index[index_slots] = np.arange(len(index_slots))
    deleted = []
    for slot in slots:
        index = int(slot_index[slot])
        if index < 0:
            continue
        last = len(index_slots) - 1
        slot_index[index_slots[last]] = index
        index_slots[index] = index_slots[last]
        index_slots = index_slots[:last]
        slot_index[slot] = -1
        deleted.append(index)
    return index_slots, slot_index, deleted


class ScannLaneIndex:
    """The ScaNN searchers of one lane (one per head) and their upkeep.

    Tree searchers (`num_leaves` set): a lane is searched exactly until it
    holds `memory_size // 2` entries, then its searchers are built from its
    entries (the same entries always give the same trees); from then on
    every write `upsert`s its slot in place (the evicted entry is replaced,
    never returned) and an empty one (padding) `delete`s it. Once the lane
    has been rewritten `memory_size` times since the build, its trees are
    rebuilt on the current keys. A lane left with fewer than
    `min_index_entries(num_leaves)` entries drops its searchers and is
    searched exactly until it again holds `memory_size // 2`: k-means cannot
    train the trees on so few keys.

    Brute-force searchers (`num_leaves=None`): exact scores of every entry
    with a fused top-k, no tree. They are built at the lane's first entry,
    kept up to date by the same upserts, deletions and rebuilds (a segment
    longer than the memory writes some slots twice, which only a rebuild
    takes), and dropped when the lane is empty.

    Args:
        scann: the `scann_ops_pybind` module.
        num_heads: int. Number of heads (searchers).
        memory_size: int. Number of ring-buffer slots.
        num_leaves: int. Tree partitions per searcher, or None for
            brute-force searchers.
        num_leaves_to_search: int. Partitions visited per query (trees).
        training_sample_size: int. Keys sampled to train the trees.
    """

    def __init__(
        self,
        scann,
        num_heads,
        memory_size,
        num_leaves,
        num_leaves_to_search,
        training_sample_size,
    ):
        self._scann = scann
        self.num_heads = num_heads
        self.memory_size = memory_size
        self.num_leaves = num_leaves
        self.num_leaves_to_search = num_leaves_to_search
        self.training_sample_size = training_sample_size
        self.brute_force = num_leaves is None
        if self.brute_force:
            self.min_entries = self.build_entries = 1
        else:
            self.min_entries = min_index_entries(num_leaves)
            self.build_entries = memory_size // 2
        self.clear()

    @property
    def settings(self):
        """int64 `[num_leaves, num_leaves_to_search, training_sample_size]`
        of the searchers (zeros: brute force), saved with them."""
        if self.brute_force:
            return np.zeros(3, "int64")
        return np.array(
            [self.num_leaves, self.num_leaves_to_search, self.training_sample_size],
            "int64",
        )

    @property
    def indexed(self):
        """Whether the lane is searched through ScaNN searchers."""
        return self.searchers is not None

    def clear(self):
        """Drops the searchers: the lane is searched exactly."""
        self.searchers = None  # one per head
        self.index_slots = None  # int64 [indexed]: searcher id -> slot
        self.writes_since_build = 0

    def _build(self, keys, positions):
        slots = np.flatnonzero(positions >= 0)
        self.searchers = []
        for head in range(self.num_heads):
            builder = self._scann.builder(keys[head, slots], 1, "dot_product")
            if self.brute_force:
                self.searchers.append(builder.score_brute_force().build().searcher)
                continue
            builder = builder.tree(
                num_leaves=self.num_leaves,
                num_leaves_to_search=self.num_leaves_to_search,
                training_sample_size=min(len(slots), self.training_sample_size),
                # k-means++ seeding: ScaNN's random seeding takes its centres
                # in the order of a hash set, and the same keys gave other
                # trees from build to build (docs/design.md).
                random_init=False,
            )
            # Exact scores inside the visited leaves: on text keys this beat
            # quantised scoring plus re-ranking in recall and speed alike.
            self.searchers.append(builder.score_brute_force().build().searcher)
        self.index_slots = slots.astype("int64")
        self.writes_since_build = 0

    def _upsert(self, keys, positions, slots):
        """Upserts the written `slots`, deletes the padded ones."""
        filled = positions[slots] >= 0
        index_slots, slot_index, deleted = delete_slots(
            self.index_slots, slots[~filled], self.memory_size
        )
        written = slots[filled]
        indices = [int(i) if i >= 0 else None for i in slot_index[written]]
        new_slots = written[slot_index[written] < 0]
        for head, searcher in enumerate(self.searchers):
            if deleted:
                searcher.delete(deleted)
            if len(written):
                searcher.upsert(indices, keys[head, written], 1)
        self.index_slots = np.concatenate([index_slots, new_slots])

    def update(self, keys, positions, slots):
        """Brings the index up to date after a write of `slots`.

        Args:
            keys: the lane's keys `[heads, memory_size, head_dim]`.
            positions: the lane's slot positions `[memory_size]` (`-1`:
                empty).
            slots: int `[segment]`, the slots just written.
        """
        entries = np.count_nonzero(positions >= 0)
        if not self.indexed:
            if entries >= self.build_entries:
                self._build(keys, positions)
        elif entries < self.min_entries:
            self.clear()
        else:
            self.writes_since_build += len(slots)
            if self.writes_since_build >= self.memory_size:
                self._build(keys, positions)
            else:
                self._upsert(keys, positions, slots)

    def search(self, queries, keys, positions, num_neighbors):
        """Slots `[query, heads, k]` (`-1`: none) of the lane's top-k.

        Args:
            queries: float32 `[query, heads, head_dim]`.
            keys: the lane's keys `[heads, memory_size, head_dim]`.
            positions: the lane's slot positions `[memory_size]`.
            num_neighbors: int, `k`.
        """
        if not self.indexed:
            filled = np.flatnonzero(positions >= 0)
            return exact_top_slots(queries, keys, filled, num_neighbors)
        num_queries = queries.shape[0]
        found = np.full((num_queries, self.num_heads, num_neighbors), -1, "int64")
        k = min(num_neighbors, len(self.index_slots))
        for head, searcher in enumerate(self.searchers):
            indices, _ = searcher.search_batched(
                queries[:, head], k, k, -1, False, 0
            )  # [query, k]
            indices = indices.astype("int64")
            valid = indices < len(self.index_slots)
            found[:, head, : indices.shape[1]] = np.where(
                valid, self.index_slots[np.where(valid, indices, 0)], -1
            )
        return found

    def state_arrays(self):
        """The index as NumPy arrays: `{}` when not indexed, else `settings`,
        `slots` (the id -> slot map), `writes_since_build` and, per head,
        each file the searcher serialises to as bytes,
        `head{head}/{file name}`."""
        if not self.indexed:
            return {}
        arrays = {
            "settings": self.settings,
            "slots": self.index_slots.copy(),
            "writes_since_build": np.array(self.writes_since_build, "int64"),
        }
        for head, searcher in enumerate(self.searchers):
            with tempfile.TemporaryDirectory() as directory:
                searcher.serialize(directory, True)
                for name in sorted(os.listdir(directory)):
                    with open(os.path.join(directory, name), "rb") as file:
                        data = np.frombuffer(file.read(), "uint8")
                    arrays[f"head{head}/{name}"] = data
        return arrays

    def restore(self, arrays, keys, positions):
        """Restores an index from `state_arrays()`; changes nothing and raises
        a ValueError if they are inconsistent or a searcher fails to load.

        Searchers saved with other `settings` (or without them, by an
        earlier version), and a lane saved without searchers (unindexed, or
        by another kind of memory), are not loaded: the index is built
        again from the lane's restored `keys` `[heads, memory_size,
        head_dim]` and `positions` `[memory_size]`, as `update` would build
        it.
        """
        if not arrays or not np.array_equal(arrays.get("settings"), self.settings):
            self.clear()
            self.update(keys, positions, np.arange(0))  # builds, if full enough
            return
        for name in ("slots", "writes_since_build"):
            if name not in arrays:
                raise ValueError(f"The saved lane index has no `{name}`.")
        slots = np.asarray(arrays["slots"])
        if (
            slots.ndim != 1
            or slots.dtype.kind not in "iu"
            or np.any((slots < 0) | (slots >= self.memory_size))
            or len(np.unique(slots)) != len(slots)
        ):
            raise ValueError(
                f"The saved lane index maps searcher ids to invalid slots "
                f"(distinct ints in [0, {self.memory_size}) expected): {slots}."
            )
        writes = np.asarray(arrays["writes_since_build"])
        if writes.shape != () or writes.dtype.kind not in "iu" or writes < 0:
            raise ValueError(f"Invalid saved `writes_since_build` {writes}.")
        searchers = [
            self._load_searcher(arrays, head) for head in range(self.num_heads)
        ]
        self.searchers = searchers
        self.index_slots = slots.astype("int64")
        self.writes_since_build = int(writes)

    def _load_searcher(self, arrays, head):
        prefix = f"head{head}/"
        files = {
            name[len(prefix) :]: data
            for name, data in arrays.items()
            if name.startswith(prefix)
        }
        if not files:
            raise ValueError(f"The saved lane index has no searcher for head {head}.")
        with tempfile.TemporaryDirectory() as directory:
            for name, data in files.items():
                # No pickles (`load_searcher` would unpickle a docid file)
                # and no paths: only the plain files ScaNN serialises.
                if not SEARCHER_FILE.fullmatch(name):
                    raise ValueError(f"Unexpected searcher file {name!r}.")
                with open(os.path.join(directory, name), "wb") as file:
                    file.write(np.asarray(data, "uint8").tobytes())
            try:
                searcher = self._scann.load_searcher(
                    directory, assets_backcompat_shim=False
                )
            except Exception as error:
                raise ValueError(
                    f"The saved searcher of head {head} does not load: {error}"
                ) from error
        return searcher.searcher

"""An independent plain-NumPy statement of the Memorizing Transformer layer.

Written from the equations (PAPER.md), not from the library: per-lane Python
deques for the FIFO memory, explicit loops over lanes and heads, float64.
"""

import collections
from fractions import Fraction

import numpy as np


def t5_bucket(relative_position, num_buckets=32, max_distance=128, bidirectional=False):
    """T5 bucket of one `key - query` distance (an int), evaluated exactly.

    T5 puts a distance `d >= m = num_buckets // 2` in bucket
    `m + floor(L * log(d / m) / log(max_distance / m))`, `L = num_buckets - m`,
    capped at the last bucket. The floor is the largest `k` with
    `(d / m) ** L >= (max_distance / m) ** k`: compared here as fractions.
    Bidirectional: keys after the query take the upper half of the buckets.
    """
    if bidirectional:
        num_buckets //= 2
        offset = num_buckets if relative_position > 0 else 0
        return offset + t5_bucket(-abs(relative_position), num_buckets, max_distance)
    distance = max(-int(relative_position), 0)
    max_exact = num_buckets // 2
    if distance < max_exact:
        return distance
    num_log = num_buckets - max_exact
    scaled = Fraction(distance, max_exact) ** num_log
    k = 0
    while k < num_log - 1 and scaled >= Fraction(max_distance, max_exact) ** (k + 1):
        k += 1
    return max_exact + k


def _normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _softmax(logits):
    logits = logits - logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()


class NumpyKNNAttention:
    """Reference forward pass with the same weights as a `KNNAttention`.

    Args:
        weights: dict with `query` kernel `[D, H, Dh]`, `key` and `value`
            kernels `[D, KV, Dh]` (query head `h` reads key and value head
            `h // (H // KV)`),
            `output` kernel `[H, Dh, D]`, `relative_bias` `[buckets, H]`,
            `scale` `[H]`, `gate_bias` `[H]` (unused without memory), and
            optionally `key_smear_logit` `[KV]`: each key is then mixed with
            the raw key of the previous real token of its document (smeared
            keys), carried across segments per lane when the layer keeps
            lane state (`use_xl_cache` or `use_memory`), else of its segment.
        use_memory: `False` states `SegmentAttention`: local attention only.
    """

    def __init__(
        self,
        weights,
        batch_size,
        memory_size,
        num_neighbors,
        use_xl_cache=False,
        num_buckets=32,
        max_distance=128,
        use_memory=True,
    ):
        self.use_memory = use_memory
        self.w = {
            name: np.asarray(value, np.float64) for name, value in weights.items()
        }
        self.batch_size = batch_size
        self.memory_size = memory_size
        self.num_neighbors = num_neighbors
        self.use_xl_cache = use_xl_cache
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        # One FIFO per lane of (key [H, Dh], value [H, Dh], position) or None
        # for a padded token, which still takes a slot.
        self.memory = [collections.deque(maxlen=memory_size) for _ in range(batch_size)]
        self.document_length = [0] * batch_size
        self.cache = [[] for _ in range(batch_size)]  # [(key, value) or None]
        # Raw key [H, Dh] of each lane's last real token, or None.
        self.last_key = [None] * batch_size

    def __call__(self, x, document_start=None, padding_mask=None):
        x = np.asarray(x, np.float64)
        batch, length, _ = x.shape
        if padding_mask is None:
            padding_mask = np.ones((batch, length), bool)
        for b in range(batch):
            if document_start is not None and document_start[b]:
                self.memory[b].clear()
                self.document_length[b] = 0
                self.cache[b] = []
                self.last_key[b] = None
        q = _normalize(np.einsum("btd,dnh->btnh", x, self.w["query"]))
        k = np.einsum("btd,dnh->btnh", x, self.w["key"])
        if "key_smear_logit" in self.w:
            k = self._smear(k, padding_mask)
        k = _normalize(k)
        v = np.einsum("btd,dnh->btnh", x, self.w["value"])
        heads = q.shape[2]
        group = heads // k.shape[2]  # query heads per key and value head
        out = np.zeros_like(q)
        positions = np.full((batch, length, heads, self.num_neighbors), -1)
        for b in range(batch):
            entries = [e for e in self.memory[b] if e is not None]
            cached = self.cache[b]
            for h in range(heads):
                n = h // group  # the key and value head
                scale = self.w["scale"][h]
                gate = 1.0 / (1.0 + np.exp(-self.w["gate_bias"][h]))
                for i in range(length):
                    if not padding_mask[b, i]:
                        continue  # a padded query's output is undefined
                    # Local: cache (positions -C..-1) then the segment up to i.
                    keys, values, bias = [], [], []
                    for c, entry in enumerate(cached):
                        if entry is not None:
                            keys.append(entry[0][n])
                            values.append(entry[1][n])
                            bias.append(self._bias(c - len(cached) - i, h))
                    for j in range(i + 1):
                        if padding_mask[b, j]:
                            keys.append(k[b, j, n])
                            values.append(v[b, j, n])
                            bias.append(self._bias(j - i, h))
                    logits = scale * np.array(keys) @ q[b, i, h] + np.array(bias)
                    local = _softmax(logits) @ np.array(values)
                    if not entries or not self.use_memory:
                        out[b, i, h] = local
                        continue
                    scores = np.array([e[0][n] @ q[b, i, h] for e in entries])
                    top = np.argsort(-scores)[: self.num_neighbors]
                    weights = _softmax(scale * scores[top])
                    retrieved = weights @ np.array([entries[t][1][n] for t in top])
                    out[b, i, h] = gate * retrieved + (1 - gate) * local
                    positions[b, i, h, : len(top)] = [entries[t][2] for t in top]
            self._write(b, k[b], v[b], padding_mask[b])
        return np.einsum("btnh,nhd->btd", out, self.w["output"]), positions

    def _smear(self, k, padding_mask):
        """`own * k[t] + (1 - own) * k[previous real token]`, per head."""
        own = 1.0 / (1.0 + np.exp(-self.w["key_smear_logit"]))
        carry = self.use_xl_cache or self.use_memory
        smeared = k.copy()
        for b in range(k.shape[0]):
            previous = self.last_key[b] if carry else None
            for t in range(k.shape[1]):
                for h in range(k.shape[2]):
                    if previous is not None:  # else not mixed
                        smeared[b, t, h] = (
                            own[h] * k[b, t, h] + (1 - own[h]) * previous[h]
                        )
                if padding_mask[b, t]:
                    previous = k[b, t]
            if carry:
                self.last_key[b] = previous
        return smeared

    def _bias(self, relative_position, head):
        bucket = t5_bucket(relative_position, self.num_buckets, self.max_distance)
        return self.w["relative_bias"][bucket, head]

    def _write(self, lane, keys, values, mask):
        for t in range(len(keys)):
            if mask[t]:
                entry = (keys[t], values[t], self.document_length[lane])
                self.document_length[lane] += 1
            else:
                entry = None
            self.memory[lane].append(entry)
        if self.use_xl_cache:
            self.cache[lane] = [
                (keys[t], values[t]) if mask[t] else None for t in range(len(keys))
            ]

"""An independent plain-NumPy statement of the Memorizing Transformer layer.

Written from the equations (PAPER.md), not from the library: per-lane Python
deques for the FIFO memory, explicit loops over lanes and heads, float64.
"""

import collections
import math

import numpy as np


def t5_bucket(relative_position, num_buckets=32, max_distance=128):
    """Causal T5 bucket of one `key - query` distance (an int)."""
    distance = max(-int(relative_position), 0)
    max_exact = num_buckets // 2
    if distance < max_exact:
        return distance
    # T5 computes the logarithmic bucket in float32.
    ratio = np.float32(np.log(np.float32(distance / max_exact))) / np.float32(
        math.log(max_distance / max_exact)
    )
    bucket = max_exact + int(np.float32(ratio * (num_buckets - max_exact)))
    return min(bucket, num_buckets - 1)


def _normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _softmax(logits):
    logits = logits - logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()


class NumpyKNNAttention:
    """Reference forward pass with the same weights as a `KNNAttention`.

    Args:
        weights: dict with `query`, `key`, `value` kernels `[D, H, Dh]`,
            `output` kernel `[H, Dh, D]`, `relative_bias` `[buckets, H]`,
            `scale` `[H]`, `gate_bias` `[H]` (unused without memory), and
            optionally `key_smear_logit` `[H]`: each key is then mixed with
            the previous key of its segment (smeared keys).
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

    def __call__(self, x, document_start=None, padding_mask=None):
        x = np.asarray(x, np.float64)
        batch, length, _ = x.shape
        if padding_mask is None:
            padding_mask = np.ones((batch, length), bool)
        q = _normalize(np.einsum("btd,dnh->btnh", x, self.w["query"]))
        k = np.einsum("btd,dnh->btnh", x, self.w["key"])
        if "key_smear_logit" in self.w:
            own = 1.0 / (1.0 + np.exp(-self.w["key_smear_logit"]))
            smeared = k.copy()
            for t in range(1, length):
                for h in range(k.shape[2]):
                    smeared[:, t, h] = (
                        own[h] * k[:, t, h] + (1 - own[h]) * k[:, t - 1, h]
                    )
            for h in range(k.shape[2]):
                smeared[:, 0, h] = own[h] * k[:, 0, h]
            k = smeared
        k = _normalize(k)
        v = np.einsum("btd,dnh->btnh", x, self.w["value"])
        heads = q.shape[2]
        out = np.zeros_like(q)
        positions = np.full((batch, length, heads, self.num_neighbors), -1)
        for b in range(batch):
            if document_start is not None and document_start[b]:
                self.memory[b].clear()
                self.document_length[b] = 0
                self.cache[b] = []
            entries = [e for e in self.memory[b] if e is not None]
            cached = self.cache[b]
            for h in range(heads):
                scale = self.w["scale"][h]
                gate = 1.0 / (1.0 + np.exp(-self.w["gate_bias"][h]))
                for i in range(length):
                    # Local: cache (positions -C..-1) then the segment up to i.
                    keys, values, bias = [], [], []
                    for c, entry in enumerate(cached):
                        if entry is not None:
                            keys.append(entry[0][h])
                            values.append(entry[1][h])
                            bias.append(self._bias(c - len(cached) - i, h))
                    for j in range(i + 1):
                        if padding_mask[b, j]:
                            keys.append(k[b, j, h])
                            values.append(v[b, j, h])
                            bias.append(self._bias(j - i, h))
                    logits = scale * np.array(keys) @ q[b, i, h] + np.array(bias)
                    local = _softmax(logits) @ np.array(values)
                    if not entries or not self.use_memory:
                        out[b, i, h] = local
                        continue
                    scores = np.array([e[0][h] @ q[b, i, h] for e in entries])
                    top = np.argsort(-scores)[: self.num_neighbors]
                    weights = _softmax(scale * scores[top])
                    retrieved = weights @ np.array([entries[t][1][h] for t in top])
                    out[b, i, h] = gate * retrieved + (1 - gate) * local
                    positions[b, i, h, : len(top)] = [entries[t][2] for t in top]
            self._write(b, k[b], v[b], padding_mask[b])
        return np.einsum("btnh,nhd->btd", out, self.w["output"]), positions

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

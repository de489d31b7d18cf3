import keras
import numpy as np
from keras import ops

from keras_memtrans.validation import check_positive_ints


class SegmentGenerator:
    """Continues prompts with a memory model, segment by segment.

    A memory model reads whole segments: each call attends within the
    segment and then appends all of it to memory. Generation therefore
    keeps a *current* segment of up to `segment_length` tokens:

    1. Every prompt is left-padded to the same whole number of segments,
       so all lanes reach segment borders together and each prompt's
       borders depend on its own length only (padding is neither attended
       to nor stored); the complete segments before the last one are read
       normally, filling the (inference) memory and XL cache.
    2. The current segment is decoded one position at a time by a step
       compiled once per model (`NextTokenStep`): the token attends to
       the segment's earlier tokens through their cached keys and values
       (and to the XL cache and memory, which it reads but never writes),
       so each new token costs one token's computation, not a segment's.
       The prompt's tokens in the current segment are decoded first, in
       one call; then each step's logits give the next token, which is
       decoded in turn.
       The loop runs in Python and commits memory only through the
       ordinary calls of steps 1 and 3, so it works the same under JAX,
       where keras-hub's compiled `generate()` loop drops state updates,
       as under TensorFlow and torch.
    3. When the current segment is full it is read normally (committed to
       memory) and a new one starts with the latest token.

    Generation reads and writes the inference memories and caches only:
    the training state that `fit` streams into is never touched, so a
    callback may generate in the middle of training.

    Args:
        causal_lm: a `MemorizingTransformerCausalLM`.
        temperature: float. 0 picks the most likely token; above 0 samples
            from the softmax of `logits / temperature`.
        seed: int. Seed of the sampler.
    """

    def __init__(self, causal_lm, temperature=0.0, seed=None):
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
        self.causal_lm = causal_lm
        self.temperature = temperature
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.batch_size = causal_lm.backbone.batch_size
        self.segment_length = causal_lm.backbone.segment_length

    def __call__(self, prompts, max_new_tokens):
        """Continuations `[len(prompts), max_new_tokens]` of token prompts.

        Args:
            prompts: list of at most `batch_size` 1-D int sequences, each
                with at least one token.
            max_new_tokens: int.
        """
        if not 1 <= len(prompts) <= self.batch_size:
            raise ValueError(
                f"Got {len(prompts)} prompts; the model has {self.batch_size} "
                "lanes, so pass between 1 and batch_size prompts."
            )
        if min(len(p) for p in prompts) < 1:
            raise ValueError("Every prompt needs at least one token.")
        check_positive_ints(max_new_tokens=max_new_tokens)
        tokens, mask = self._left_pad(prompts)
        length = self.segment_length
        complete = (tokens.shape[1] - 1) // length
        self.causal_lm.reset_state(training=False)
        for step in range(complete):
            window = slice(step * length, (step + 1) * length)
            self._read(tokens[:, window], mask[:, window], document_start=step == 0)
        current = tokens[:, complete * length :]
        current_mask = mask[:, complete * length :]
        first = complete == 0
        logits = self._decode(current, 0, current_mask)
        generated = []
        for _ in range(max_new_tokens):
            next_token = self._pick(logits)
            generated.append(next_token)
            if current.shape[1] == length:
                self._read(current, current_mask, document_start=first)
                first = False
                current = next_token[:, None]
                current_mask = np.ones_like(current, bool)
            else:
                current = np.concatenate([current, next_token[:, None]], axis=1)
                current_mask = np.concatenate(
                    [current_mask, np.ones((self.batch_size, 1), bool)], axis=1
                )
            if len(generated) < max_new_tokens:
                logits = self._decode(
                    next_token[:, None], current.shape[1] - 1, current_mask[:, -1:]
                )
        return np.stack(generated, axis=1)[: len(prompts)]

    def _left_pad(self, prompts):
        # A whole number of segments: each prompt then sits on the segment
        # grid by its own length alone, so the other prompts' lengths change
        # neither its segment borders nor its continuation.
        longest = max(len(p) for p in prompts)
        longest = -(-longest // self.segment_length) * self.segment_length
        tokens = np.zeros((self.batch_size, longest), "int32")
        mask = np.zeros((self.batch_size, longest), bool)
        for lane, prompt in enumerate(prompts):
            tokens[lane, longest - len(prompt) :] = prompt
            mask[lane, longest - len(prompt) :] = True
        return tokens, mask

    def _inputs(self, tokens, mask, document_start):
        padding = self.segment_length - tokens.shape[1]
        return {
            "token_ids": np.pad(tokens, ((0, 0), (0, padding))),
            "padding_mask": np.pad(mask, ((0, 0), (0, padding))),
            "document_start": np.full((self.batch_size,), document_start),
        }

    def _read(self, tokens, mask, document_start):
        """Reads a complete segment, writing it to memory and cache, with
        the backbone's predict step (compiled where the backend compiles;
        no logits, none are needed)."""
        self.causal_lm.backbone.predict_on_batch(
            self._inputs(tokens, mask, document_start)
        )

    def _decode(self, tokens, position, token_mask):
        """Next-token logits `[batch, vocab]` after `tokens` `[batch, n]`
        from `position` of the current segment on (`NextTokenStep`)."""
        return self.causal_lm._next_token_steps(
            {
                "token_ids": np.asarray(tokens, "int32"),
                "cache_update_index": np.full((self.batch_size,), position, "int32"),
                "token_mask": np.asarray(token_mask, bool),
            }
        )

    def _pick(self, logits):
        """The next token of each lane: the likeliest, or a sample."""
        if self.temperature == 0:
            return np.argmax(logits, axis=-1).astype("int32")
        chosen = keras.random.categorical(
            logits / self.temperature, 1, seed=self.seed_generator
        )[:, 0]
        return np.asarray(ops.convert_to_numpy(chosen), "int32")

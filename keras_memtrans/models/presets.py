"""Architectures, by name.

`backbone` holds `MemorizingTransformerBackbone` arguments except the
vocabulary size, which comes from the tokenizer (`vocabulary_size`). How
long and how fast the recipes train each one is theirs to say
(`recipes/common.py`).
"""

# The CPU presets' model. Smeared keys and key projections that start as
# copies of the query projections make a model this small learn to copy
# within a few hundred steps (held-out perplexity 23.7 against 37.5 with
# independent initialisation and 40.3 with neither, docs/results.md).
_CPU_BACKBONE = dict(
    num_layers=4,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=512,
    batch_size=8,
    segment_length=128,
    memory_layer_indices=(0,),
    smear_keys=True,
    tie_query_key_init=True,
)

PRESETS = {
    # Tests: a model that builds and steps in seconds.
    "tiny": {
        "vocabulary_size": 512,
        "backbone": dict(
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            batch_size=2,
            segment_length=32,
            memory_layer_indices=(-1,),
            memory_options=dict(memory_size=256, num_neighbors=8),
        ),
    },
    # The README's main job: with and without memory in under 15 min on 2 CPU
    # cores.
    "quick": {
        "vocabulary_size": 2048,
        "backbone": dict(
            _CPU_BACKBONE, memory_options=dict(memory_size=2048, num_neighbors=32)
        ),
    },
    # The CPU recipe: the same model with a larger memory, trained longer on
    # the whole corpus; a visible perplexity gain on 2 cores in well under an
    # hour.
    "small": {
        "vocabulary_size": 2048,
        "backbone": dict(
            _CPU_BACKBONE, memory_options=dict(memory_size=4096, num_neighbors=32)
        ),
    },
    # The paper's model: 12 layers, d_model 1024, 8 heads of 128, memory at layer 9.
    "paper": {
        "vocabulary_size": 32000,
        "backbone": dict(
            num_layers=12,
            num_heads=8,
            hidden_dim=1024,
            intermediate_dim=4096,
            batch_size=8,
            segment_length=512,
            memory_layer_indices=(8,),
            memory_options=dict(memory_size=8192, num_neighbors=32),
        ),
    },
}


def get_preset(name):
    """The preset called `name`; a ValueError lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]

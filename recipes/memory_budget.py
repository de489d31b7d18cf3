"""The largest kNN memory per lane that fits a device, for a preset.

Data-parallel training (`recipes.train --data-parallel`) gives each device
`lanes_per_device` lanes. A device then holds, in bytes:

- the replicated weights, their two AdamW moments and their gradients:
  16 per parameter (float32);
- per lane and memory layer, two memories (training and inference) of
  `memory_size` slots, each slot a float32 key and value per head and an
  int32 position (`recipes.flags.bytes_per_memory_slot`), plus a segment's
  spare slots (the memory on a device is an `ExactMemory`);
- per lane and memory layer, the exact search's float32 scores
  `[heads, segment, memory_size]`, written once per step;
- per lane, the other activations a step keeps for backpropagation,
  estimated as Korthikanti et al. (2022) count them for a transformer layer
  (`34 + 5 * heads * attended / hidden_dim` bytes per token and hidden unit,
  attended = 2 segments with the XL cache) plus the logits, their softmax
  and gradient (3 float32 per token and vocabulary entry).

`--headroom` keeps a share of the device for the compiler's workspace.

    python -m recipes.memory_budget --preset paper
"""

import argparse
import sys

import keras
import numpy as np

from keras_memtrans.models import MemorizingTransformerBackbone
from keras_memtrans.models import get_preset
from recipes.flags import bytes_per_memory_slot

# Devices of docs/scaling.md: name -> bytes of accelerator memory.
DEVICES = {"H100 (80 GB)": 80e9, "TPU v5e chip (16 GB)": 16e9}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--lanes-per-device", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--headroom", type=float, default=0.1)
    return parser.parse_args(argv)


def parameter_count(backbone_config, vocabulary_size):
    """Trainable parameters of the preset's backbone (built with one lane
    and the smallest memory: the weights do not depend on either)."""
    config = dict(backbone_config, batch_size=1)
    config["memory_options"] = dict(config["memory_options"], memory_size=512)
    backbone = MemorizingTransformerBackbone(vocabulary_size=vocabulary_size, **config)
    return sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)


def bytes_per_lane(config, vocabulary_size):
    """`(fixed, per_slot)`: the bytes a lane costs apart from its
    `memory_size` slots (activations and the memories' spare slots), and
    those of each of these slots (memories and search scores)."""
    hidden, heads = config["hidden_dim"], config["num_heads"]
    segment = config["segment_length"]
    attended = 2 * segment if config.get("use_xl_cache", True) else segment
    per_layer = segment * hidden * (34 + 5 * heads * attended / hidden)
    activations = config["num_layers"] * per_layer + 3 * 4 * segment * vocabulary_size
    slot = bytes_per_memory_slot(config)
    scores = len(config["memory_layer_indices"]) * heads * segment * 4
    return activations + segment * slot, slot + scores


def largest_memory(capacity, lanes, fixed, lane_fixed, per_slot, headroom):
    """The largest memory_size (slots per lane) that fits, or 0."""
    free = capacity * (1 - headroom) - fixed - lanes * lane_fixed
    return max(0, int(free // (lanes * per_slot)))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = get_preset(args.preset)
    config = preset["backbone"]
    parameters = parameter_count(config, preset["vocabulary_size"])
    fixed = 16 * parameters
    lane_fixed, per_slot = bytes_per_lane(config, preset["vocabulary_size"])
    print(
        f"preset {args.preset}: {parameters:,} parameters ({fixed / 1e9:.2f} GB "
        f"with AdamW and gradients); per lane {lane_fixed / 1e9:.2f} GB of "
        f"activations and spare memory slots, and {per_slot:,.0f} bytes per "
        f"memory slot (backend {keras.backend.backend()}, headroom "
        f"{args.headroom:.0%})\n"
    )
    print("| device | lanes per device | largest memory_size per lane |")
    print("|---|---|---|")
    for device, capacity in DEVICES.items():
        for lanes in args.lanes_per_device:
            slots = largest_memory(
                capacity, lanes, fixed, lane_fixed, per_slot, args.headroom
            )
            print(f"| {device} | {lanes} | {slots:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

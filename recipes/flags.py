"""The training recipe's flags: parsing, checking and the resolved config.

Every flag is checked before anything is read or trained: sizes are
positive, floats finite, and the model settings are checked as the model
would check them (and against this machine's memory) before the corpus is
read and the tokenizer trained.
"""

import argparse
import json
import math
import os
import pathlib

import keras

from keras_memtrans import KNNAttention
from keras_memtrans.memory.factory import MEMORY_KINDS
from keras_memtrans.memory.factory import resolve_memory_kind
from keras_memtrans.models import PRESETS
from keras_memtrans.models import get_preset
from recipes.common import TRAINING

# Steps between checkpoints unless `--checkpoint-every` says otherwise: a
# few minutes of the CPU presets' training.
DEFAULT_CHECKPOINT_EVERY = 200


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text):
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def auto_or_positive_int(text):
    """argparse type: `"auto"`, or an int of at least 1."""
    return text if text == "auto" else positive_int(text)


def non_negative_int(text):
    """argparse type: an int of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite float above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def finite_float(text):
    """argparse type: a finite float (`nan` and `inf` are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_keep_freed_memory(parser):
    """`--keep-freed-memory` / `--no-keep-freed-memory`: whether the
    process's `malloc` keeps freed memory for reuse
    (`recipes.host_memory.keep_freed_memory`)."""
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc's malloc keeps freed memory for the next step instead of "
        "faulting it in again (recipes/host_memory.py); a setting of the "
        "process: --resume takes it from its own command line",
    )


def keep_freed_memory_flag(args):
    """`args`' `--keep-freed-memory` as a worker process's flag."""
    return "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"


def parse_args(argv, description=None):
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument(
        "--corpus",
        default=None,
        help="directory, glob, file or JSONL of documents "
        "(default: the Python standard library's source files)",
    )
    # The last of --no-memory and --compare counts: `tox -e train` passes
    # --compare, and `tox -e train -- --no-memory` then trains one model.
    parser.add_argument(
        "--no-memory",
        dest="models",
        action="store_const",
        const=("no_memory",),
        default=("memory",),
        help="train only the model without memory",
    )
    parser.add_argument(
        "--compare",
        dest="models",
        action="store_const",
        const=("memory", "no_memory"),
        help="train with and without memory",
    )
    parser.add_argument(
        "--steps", type=positive_int, help="training steps (preset default)"
    )
    parser.add_argument(
        "--memory-kind",
        choices=MEMORY_KINDS,
        help="memory kind (preset default: auto, ScaNN from 32K tokens)",
    )
    parser.add_argument(
        "--jit-compile",
        default="auto",
        choices=("auto", "true", "false"),
        help="XLA (TensorFlow, JAX): auto uses it wherever the memory "
        "allows (torch: eager)",
    )
    add_keep_freed_memory(parser)
    parser.add_argument(
        "--memory-size", type=positive_int, help="tokens per memory lane"
    )
    parser.add_argument(
        "--num-neighbors", type=positive_int, help="k of the kNN lookup"
    )
    parser.add_argument(
        "--top-k",
        choices=("exact", "approx"),
        help="the exact memory's top-k (approx: approx_max_k, fast on TPU)",
    )
    parser.add_argument(
        "--recall-target", type=finite_float, help="recall target of --top-k approx"
    )
    parser.add_argument(
        "--scores-per-block",
        type=auto_or_positive_int,
        help="exact memory: the most scores one step of its search computes "
        "(whole (lane, head)s; one step for a number above them all; "
        "default auto: 2**21 on the CPU, 2**28 on a GPU or TPU)",
    )
    parser.add_argument(
        "--num-leaves", type=positive_int, help="ScaNN tree partitions per searcher"
    )
    parser.add_argument(
        "--num-leaves-to-search",
        type=positive_int,
        help="ScaNN partitions a search visits",
    )
    parser.add_argument("--head-dim", type=positive_int, help="size of each head")
    parser.add_argument(
        "--num-key-value-heads",
        type=positive_int,
        help="key and value heads per block, a divisor of the heads "
        "(grouped-query attention; 1: multi-query; default: one per head)",
    )
    parser.add_argument(
        "--memory-layers",
        type=int,
        nargs="+",
        help="indices of the memory layers (negative: from the top)",
    )
    parser.add_argument(
        "--smear-keys",
        choices=("true", "false"),
        help="mix each key with the previous token's key (preset default)",
    )
    parser.add_argument(
        "--tie-query-key-init",
        choices=("true", "false"),
        help="start each key projection as a copy of the query projection "
        "(preset default)",
    )
    parser.add_argument("--batch-size", type=positive_int, help="number of lanes")
    parser.add_argument(
        "--segment-length", type=positive_int, help="tokens per segment"
    )
    parser.add_argument(
        "--vocabulary-size", type=positive_int, help="SentencePiece vocabulary"
    )
    parser.add_argument(
        "--learning-rate", type=positive_float, help="peak learning rate"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        help="also evaluate on the held-out documents every this many steps "
        "(a learning curve, with the memory gates, in the results)",
    )
    parser.add_argument(
        "--max-documents", type=positive_int, help="cap on corpus documents"
    )
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--validation-fraction", type=finite_float, default=0.1)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help="steps between checkpoints (weights, optimizer, memories)",
    )
    parser.add_argument(
        "--resume",
        type=pathlib.Path,
        help="continue the interrupted run in this output directory (its "
        "other flags are the run's own)",
    )
    parser.add_argument(
        "--init-from",
        type=pathlib.Path,
        help="start from the weights of this trained model (a preset "
        "directory, a checkpoint directory or a .keras file) and fine-tune; "
        "memory parameters start at their initial values (with --compare the "
        "model without memory is fine-tuned the same way, as a control)",
    )
    parser.add_argument(
        "--data-parallel",
        action="store_true",
        help="train on several devices, each with its share of the lanes and "
        "only their memory: every visible device on JAX, one torchrun "
        "process per device on torch (docs/scaling.md)",
    )
    parser.add_argument("--output-dir", type=pathlib.Path, default=None)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return parser.parse_args(argv)


def resumed_args(output_dir, description=None):
    """`(argv, args)` of the run in `output_dir`, as `--resume` continues it:
    on the backend it was started on, its relative paths read from the
    directory it was started in.

    Raises:
        FileNotFoundError: `output_dir` holds no `run.json`.
        ValueError: `KERAS_BACKEND` names another backend than the run's.
    """
    record = pathlib.Path(output_dir) / "run.json"
    if not record.exists():
        raise FileNotFoundError(
            f"--resume {output_dir}: no run.json there, so it is not a "
            "directory that recipes.train started."
        )
    run = json.loads(record.read_text())
    backend = keras.backend.backend()
    if run["backend"] != backend:
        raise ValueError(
            f"--resume {output_dir}: the run trains on {run['backend']}, this "
            f"process on {backend}: resume it with KERAS_BACKEND={run['backend']}."
        )
    args = parse_args(run["argv"], description)
    started_in = run.get("directory", os.getcwd())
    for flag in ("corpus", "init_from"):
        if getattr(args, flag) is not None:
            path = os.path.join(started_in, getattr(args, flag))
            setattr(args, flag, type(getattr(args, flag))(path))
    return run["argv"], args


def resolve_config(args):
    """The preset and its training defaults, with every flag that was given
    taking precedence."""
    preset = get_preset(args.preset)
    backbone = dict(preset["backbone"])
    backbone["memory_options"] = dict(backbone.get("memory_options") or {})
    training = dict(TRAINING[args.preset])
    for flag in KNNAttention.memory_options():
        if getattr(args, flag) is not None:
            backbone["memory_options"][flag] = getattr(args, flag)
    for flag in ("head_dim", "num_key_value_heads", "batch_size", "segment_length"):
        if getattr(args, flag) is not None:
            backbone[flag] = getattr(args, flag)
    if args.memory_layers is not None:
        backbone["memory_layer_indices"] = tuple(args.memory_layers)
    for flag in ("smear_keys", "tie_query_key_init"):
        if getattr(args, flag) is not None:
            backbone[flag] = getattr(args, flag) == "true"
    for flag in ("steps", "learning_rate", "max_documents"):
        if getattr(args, flag) is not None:
            training[flag] = getattr(args, flag)
    vocabulary_size = args.vocabulary_size
    if vocabulary_size is None:
        vocabulary_size = preset["vocabulary_size"]
    check_model_settings(backbone)
    return backbone, training, vocabulary_size


def memory_slots(backbone, options):
    """Slots per lane of each memory of a backbone config, with its memory
    `options` resolved: `memory_size`, plus a segment's spare slots in an
    exact memory (see `ExactMemory`). `resolve_memory_kind` asks no device,
    so this count runs before a multi-process JAX run starts its backends
    (`recipes.jax_processes`)."""
    kind = resolve_memory_kind(options["memory_kind"], options["memory_size"])
    spare = backbone["segment_length"] if kind == "exact" else 0
    return options["memory_size"] + spare


def bytes_per_memory_slot(backbone):
    """Bytes of one slot of every memory of one lane of a backbone config:
    two memories (training and inference) per memory layer, each slot a
    float32 key and value per key and value head and an int32 position."""
    head_dim = backbone.get("head_dim") or (
        backbone["hidden_dim"] // backbone["num_heads"]
    )
    heads = backbone.get("num_key_value_heads") or backbone["num_heads"]
    per_memory = 2 * heads * head_dim * 4 + 4
    return 2 * len(backbone["memory_layer_indices"]) * per_memory


def memory_bytes(backbone, options):
    """Bytes the memories of a backbone config hold, with its memory
    `options` resolved: `memory_slots` per lane of `bytes_per_memory_slot`."""
    slots = backbone["batch_size"] * memory_slots(backbone, options)
    return slots * bytes_per_memory_slot(backbone)


def check_model_settings(backbone):
    """Raises a ValueError naming a model setting that cannot work, before
    any data is read: options the layer refuses, a segment longer than the
    memory, or memories larger than this machine's RAM."""
    options = {**KNNAttention.memory_options(), **backbone["memory_options"]}
    KNNAttention(  # checks them, and the key and value heads
        num_heads=backbone["num_heads"],
        num_key_value_heads=backbone.get("num_key_value_heads"),
        **options,
    )
    if backbone["memory_layer_indices"] and (
        backbone["segment_length"] > options["memory_size"]
    ):
        raise ValueError(
            f"--segment-length ({backbone['segment_length']}) exceeds "
            f"--memory-size ({options['memory_size']}): a segment would "
            "overwrite itself in memory."
        )
    needed = memory_bytes(backbone, options)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ValueError(
            f"The memories need {needed / 2**30:.1f} GiB (2 memories x keys "
            f"and values x {backbone['batch_size']} lanes x memory_size "
            f"{options['memory_size']} x key heads x head_dim x 4 bytes, per "
            f"memory layer) but this machine has {available / 2**30:.1f} GiB: "
            "lower --memory-size or --batch-size."
        )

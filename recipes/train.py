"""Train a Memorizing Transformer with `model.fit` and report held-out perplexity.

The backend is whatever `KERAS_BACKEND` names (tensorflow, jax or torch). The
default corpus is the running Python's own standard library: long, real
source files. Documents are split into training and validation by document;
a SentencePiece vocabulary is learnt on the training part; the model reads
each document segment by segment, in lanes, with its kNN memory.

    KERAS_BACKEND=jax python -m recipes.train --preset quick --compare

`--compare` trains the same model twice, with and without memory (same
tokenizer, data order and initial seed), and prints both perplexities;
`--no-memory` trains only the model without memory. The output directory,
never overwritten (a new `-N` suffix is chosen instead), gets:

- `memory/`, `no_memory/`: each trained model as a keras-hub preset
  (`MemorizingTransformerCausalLM.from_preset("runs/quick-jax/memory")`);
- `training/memory/`, `training/no_memory/`: a `.keras` checkpoint, a CSV
  log and TensorBoard logs of each run;
- `results.json` and `results.md`, with the machine and package versions
  they were measured with (`reporting.run_environment`).

`--data-parallel` trains on several devices, each with its share of the
lanes and only their memories: every device JAX sees (of every host, when
launched with Keras' `KERAS_DISTRIBUTION_*` variables), or one `torchrun`
process per device on torch (`recipes/data_parallel.py`, docs/scaling.md).
"""

import contextlib
import functools
import json
import math
import os
import pathlib
import platform
import sys
import time

import keras

from keras_memtrans.data import LaneStreamer
from keras_memtrans.models import MemorizingTransformerCausalLM
from keras_memtrans.models import MemorizingTransformerPreprocessor
from keras_memtrans.models import MemorizingTransformerTokenizer
from recipes import checkpointing
from recipes.common import build_causal_lm
from recipes.common import compile_for_training
from recipes.common import jit_compile_flag
from recipes.common import save_preset
from recipes.common import split_corpus
from recipes.data_parallel import start_data_parallel
from recipes.flags import parse_args
from recipes.flags import resolve_config
from recipes.flags import resumed_args
from recipes.host_memory import keep_freed_memory
from recipes.processes import SINGLE
from recipes.reporting import HeldOutCurve
from recipes.reporting import environment_line
from recipes.reporting import held_out_scores
from recipes.reporting import json_safe
from recipes.reporting import markdown_table
from recipes.reporting import run_environment


class StopAfterSteps(keras.callbacks.Callback):
    """Ends `fit` after exactly `steps` batches, mid-epoch if need be."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.done = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done >= self.steps:
            self.model.stop_training = True


def epoch_length(args, steps):
    """Steps per `fit` epoch: epochs end where checkpoints and held-out
    evaluations fall (and reporting happens)."""
    intervals = [args.checkpoint_every, args.eval_every or args.checkpoint_every]
    return min(steps, math.gcd(*intervals))


def train_and_evaluate(
    name, causal_lm, training, documents, args, output_dir, processes=SINGLE
):
    """Trains one model (from its latest checkpoint, if any), scores it on
    the held-out documents and saves it as the preset `output_dir / name`.
    With several `processes` (`--data-parallel` on torch, or JAX on several
    hosts), each trains on its share of the lanes and process 0 writes the
    run's files.

    Returns:
        The run's results, or `None` when training diverged (the last good
        checkpoint is kept).
    """
    log_dir = output_dir / "training" / name
    log_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "curve": [], "train_seconds": 0.0}
    checkpoint = checkpointing.latest_checkpoint(log_dir)
    if checkpoint is not None:
        causal_lm, state = checkpointing.load_checkpoint(checkpoint, processes)
        print(f"\n[{name}] resuming from {checkpoint}", flush=True)
    processes.synchronise(causal_lm)
    train_docs, validation_docs = documents
    lanes = causal_lm.backbone.batch_size
    length = causal_lm.backbone.segment_length
    memory_layers = causal_lm.backbone.memory_layers
    # Training reads passes endlessly (no lane idles at a pass's end) and
    # `fit` continues the stream across its epochs; evaluation, one pass.
    train_stream = LaneStreamer(  # every process's lanes
        train_docs,
        processes.stream_lanes(lanes),
        length,
        shuffle=True,
        repeat=True,
        seed=args.seed,
    )
    validation_stream = processes.lanes(
        LaneStreamer(
            validation_docs, processes.stream_lanes(lanes), length, shuffle=False
        )
    )
    steps, first_step = training["steps"], state["step"]
    steps_per_epoch = epoch_length(args, steps)
    global_logs = functools.partial(processes.global_logs, causal_lm)
    curve = HeldOutCurve(
        validation_stream, steps_per_epoch, steps, args.eval_every, global_logs
    )
    curve.rows = state["curve"]
    started = time.perf_counter()

    def checkpoint_state(logs):
        seconds = state["train_seconds"] + time.perf_counter() - started
        loss = logs.get("token_nll", state.get("train_loss"))
        return {"curve": curve.rows, "train_seconds": seconds, "train_loss": loss}

    stop = StopAfterSteps(steps - first_step)
    logs = []
    if processes.is_main:  # an epoch's row is logged before its checkpoint
        epochs_done = math.ceil(first_step / steps_per_epoch)
        checkpointing.truncate_log(log_dir / "log.csv", epochs_done)
        logs = [
            keras.callbacks.CSVLogger(str(log_dir / "log.csv"), append=first_step > 0),
            keras.callbacks.TensorBoard(str(log_dir / "tensorboard")),
        ]
    checkpoint = checkpointing.StepCheckpoint(
        log_dir, args.checkpoint_every, steps, first_step, checkpoint_state, processes
    )
    callbacks = [
        *processes.callbacks(),
        stop,
        keras.callbacks.TerminateOnNaN(),
        *([curve] if args.eval_every else []),
        *logs,
        checkpoint,
    ]
    print(
        f"\n[{name}] steps {first_step + 1}-{steps} in epochs of at most "
        f"{steps_per_epoch}; padding: {train_stream.padding_fraction(steps):.1%} "
        "of training token slots",
        flush=True,
    )
    if first_step < steps:
        causal_lm.fit(
            checkpointing.StreamFrom(processes.lanes(train_stream), first_step),
            initial_epoch=first_step // steps_per_epoch,
            epochs=math.ceil(steps / steps_per_epoch),
            steps_per_epoch=steps_per_epoch,
            shuffle=False,  # a PyDataset shuffled by fit would break the lanes
            callbacks=callbacks,
            verbose=args.verbose if processes.is_main else 0,  # one progress bar
        )
    latest = checkpointing.latest_checkpoint(log_dir)
    final_state = {"step": 0}
    if latest is not None:
        final_state = json.loads((latest / "state.json").read_text())
    if final_state["step"] < steps:
        return None  # diverged: TerminateOnNaN stopped it before the end
    if args.eval_every:  # the curve's last point is the trained model's
        final = curve.rows[-1]
    else:
        final = held_out_scores(causal_lm, validation_stream, global_logs)
    if processes.is_main and not (output_dir / name).exists():
        with processes.alone():  # unless saved before a kill
            save_preset(causal_lm, output_dir / name)
    return {
        "run": name,
        "memory_layers": list(causal_lm.backbone.memory_layer_indices),
        "memory_size": memory_layers[0].memory_size if memory_layers else None,
        "train_loss": final_state["train_loss"],
        **final,
        "curve": curve.rows,
        "train_seconds": round(final_state["train_seconds"], 1),
        "steps": final_state["step"],
        "jit_compile": bool(causal_lm.jit_compile),
        "preset_dir": str((output_dir / name).resolve()),
        "checkpoint": str((latest / "model.keras").resolve()),
    }


def load_trained_model(path):
    """A trained `MemorizingTransformerCausalLM` from a preset directory, a
    checkpoint directory (`model.keras` inside) or a `.keras` file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"--init-from {path}: no such preset directory, checkpoint or .keras file."
        )
    if (path / "model.keras").exists():
        path = path / "model.keras"
    if path.suffix == ".keras":
        return keras.saving.load_model(path)
    return MemorizingTransformerCausalLM.from_preset(path)


def initialised_from(causal_lm, source):
    """Copies every weight of the trained `source` into `causal_lm` (matched
    by path); weights `source` lacks (the memory's gates) keep their init."""
    weights = {w.path: w for w in causal_lm.weights}
    for weight in source.weights:
        if weight.path not in weights:
            raise ValueError(
                f"--init-from: the new model has no weight {weight.path!r}; "
                "build it with the same architecture as the trained model."
            )
        target = weights[weight.path]
        if tuple(target.shape) != tuple(weight.shape):
            raise ValueError(
                f"--init-from: {weight.path!r} has shape {tuple(weight.shape)} "
                f"in the trained model and {tuple(target.shape)} in the new one."
            )
        # A NumPy copy: JAX's `fit` donates (deletes) each variable's buffer,
        # and `source` may start another model after this one trains.
        target.assign(keras.ops.convert_to_numpy(weight.value))
    return causal_lm


def read_corpus(args, max_documents):
    """`(corpus_settings, corpus, train_corpus, validation_corpus)`: the
    run's corpus, read (and split by document) before the run claims its
    directory, so that a bad corpus fails first."""
    corpus_settings = {
        "source": args.corpus and os.path.abspath(args.corpus),
        "python": platform.python_version(),
        "min_chars": args.min_chars,
        "max_documents": max_documents,
        "validation_fraction": args.validation_fraction,
        "seed": args.seed,
    }
    corpus, train_corpus, validation_corpus = split_corpus(corpus_settings)
    print(corpus.summary())
    return corpus_settings, corpus, train_corpus, validation_corpus


def tokenized_documents(
    args, output_dir, parts, vocabulary_size, source=None, processes=SINGLE
):
    """`(preprocessor, (train_docs, validation_docs))` of the corpus `parts`
    (training, validation). The tokenizer is learnt once (by process 0) and
    kept in `training/vocabulary.spm`, which every process and a resumed
    run read back; with `--init-from` it is the trained model's."""
    train_corpus, validation_corpus = parts
    vocabulary = output_dir / "training" / "vocabulary.spm"
    if processes.is_main and not vocabulary.exists():
        if source is not None:
            tokenizer = source.preprocessor.tokenizer
        else:
            tokenizer = MemorizingTransformerTokenizer.from_documents(
                train_corpus.texts, vocabulary_size, seed=args.seed
            )
        checkpointing.atomic_write(vocabulary, tokenizer.proto)
    processes.barrier()
    tokenizer = MemorizingTransformerTokenizer(proto=vocabulary.read_bytes())
    preprocessor = MemorizingTransformerPreprocessor(tokenizer)
    documents = (
        preprocessor(train_corpus.texts),
        preprocessor(validation_corpus.texts),
    )
    return preprocessor, documents


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, __doc__.splitlines()[0])
    if args.keep_freed_memory:  # this process's setting, resumed or not
        keep_freed_memory()
    output_dir = args.resume
    if output_dir is not None:
        argv, args = resumed_args(output_dir, __doc__.splitlines()[0])
        print(f"Resuming {output_dir}: recipes.train {' '.join(argv)}")
    backbone_config, training, vocabulary_size = resolve_config(args)
    # One device; or several: a JAX distribution, or torch processes, each
    # building a model of its share of the lanes (`model_config`).
    distribution, processes, model_config = None, SINGLE, backbone_config
    if args.data_parallel:
        distribution, processes, model_config = start_data_parallel(backbone_config)
    devices = distribution.device_mesh.devices.size if distribution else processes.count
    backend = keras.backend.backend()
    # What the run reads is read before it claims a directory.
    source = None if args.init_from is None else load_trained_model(args.init_from)
    corpus_settings, corpus, *parts = read_corpus(args, training["max_documents"])
    if output_dir is None and processes.is_main:
        output_dir = checkpointing.claim_directory(
            args.output_dir or pathlib.Path("runs") / f"{args.preset}-{backend}"
        )
        run = {"argv": argv, "backend": backend, "directory": os.getcwd()}
        checkpointing.atomic_write(output_dir / "run.json", json.dumps(run))
    output_dir = processes.broadcast(output_dir)
    preprocessor, documents = tokenized_documents(
        args, output_dir, parts, vocabulary_size, source, processes
    )
    vocabulary_size = preprocessor.tokenizer.vocabulary_size()
    train_docs, validation_docs = documents
    print(
        f"{len(train_docs)} training / {len(validation_docs)} validation documents, "
        f"{sum(map(len, train_docs))} / {sum(map(len, validation_docs))} tokens, "
        f"vocabulary {vocabulary_size}, backend {backend}"
    )
    runs = [(name, name == "memory") for name in args.models]
    results_path = output_dir / "results.json"
    results = []
    if results_path.exists():
        results = json.loads(results_path.read_text())["results"]
    jit_compile = jit_compile_flag(args.jit_compile)
    environment = run_environment()
    header = (
        f"Preset `{args.preset}`, backend {backend}, corpus: {corpus.summary()}\n\n"
        f"Command: `KERAS_BACKEND={backend} python -m recipes.train {' '.join(argv)}`"
        f"\n\n{environment_line(environment)}"
    )
    for name, use_memory in runs:
        if any(result["run"] == name for result in results):
            continue  # finished before the run was interrupted
        # Each model is built, trained and evaluated on the run's devices.
        with distribution.scope() if distribution else contextlib.nullcontext():
            causal_lm = build_causal_lm(
                model_config, vocabulary_size, preprocessor, use_memory, args.seed
            )
            if source is not None:
                initialised_from(causal_lm, source)
            compile_for_training(causal_lm, training, jit_compile, processes.loss())
            result = train_and_evaluate(
                name, causal_lm, training, documents, args, output_dir, processes
            )
        if result is None:
            log_dir = output_dir / "training" / name
            print(
                f"[{name}] training diverged (a non-finite loss or weights): "
                f"stopped; the last good checkpoint is in {log_dir}."
            )
            return 1
        results.append(result)
        if not processes.is_main:
            continue
        # Each model's results are written as soon as it is evaluated.
        report = {
            "preset": args.preset,
            "backend": backend,
            "backbone": backbone_config,
            "training": training,
            "vocabulary_size": vocabulary_size,
            "corpus": corpus_settings,
            "init_from": args.init_from and str(args.init_from.resolve()),
            "devices": devices,
            "environment": environment,
            "results": results,
        }
        checkpointing.atomic_write(
            results_path, json.dumps(json_safe(report), indent=2, allow_nan=False)
        )
        checkpointing.atomic_write(
            output_dir / "results.md", markdown_table(results, header)
        )
    print("\n" + markdown_table(results, header))
    print(f"Results in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

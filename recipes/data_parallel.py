"""`--data-parallel`: the recipe's model trained on several devices.

Each device reads some of the lanes, the weights are replicated, and each
device keeps only its own lanes' state (XL caches, carried keys, kNN
memories): nothing about a memory crosses devices, only gradients do.

- JAX: `keras.distribution` runs one step over every visible device. The
  lanes (the input batch) are split across them and every per-lane state
  is sharded along its lane axis by
  `MemorizingTransformerBackbone.get_layout_map`. A ScaNN memory cannot
  run there (its searchers are called back on one host), so
  `memory_kind="auto"` picks the in-graph exact memory and `"scann"` is
  refused.
- torch: one process per device, launched by `torchrun`, each with a model
  of `batch_size / processes` lanes (`Processes`): its memories, ScaNN's
  included, hold its own lanes only.
- TensorFlow: refused, with the reason (`TENSORFLOW_REFUSAL`).

docs/scaling.md says how to launch it on TPU VMs and multi-GPU hosts.
"""

import os

import keras
from keras import ops

from keras_memtrans.models import MemorizingTransformerBackbone

TENSORFLOW_REFUSAL = (
    "--data-parallel is not supported on TensorFlow: Keras' distribution "
    "API is a DTensor prototype there, and under tf.distribute."
    "MirroredStrategy each variable is mirrored, so a lane state written "
    "by each replica keeps one replica's value and loses the other "
    "lanes' (measured: docs/scaling.md). Use KERAS_BACKEND=jax or torch."
)


def start_data_parallel(backbone_config, devices=None):
    """The engine of a `--data-parallel` run, checked before anything runs.

    Args:
        backbone_config: the run's backbone arguments (`batch_size`, the
            global number of lanes, and `memory_options`).
        devices: JAX only: the device names; all visible devices by default.

    Returns:
        `(distribution, processes, config)`: the JAX
        `keras.distribution.ModelParallel` (None on torch), the run's
        `Processes` (this one alone on JAX), and the backbone arguments of
        this process's model (its share of the lanes on torch).

    Raises:
        ValueError: on TensorFlow, for a ScaNN memory on JAX, on torch
            outside `torchrun`, or where `batch_size` does not divide by
            the number of devices.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        raise ValueError(TENSORFLOW_REFUSAL)
    batch_size = backbone_config["batch_size"]
    if backend == "torch":
        processes = start_torch_processes()
        check_divides(batch_size, processes.count, "processes")
        config = dict(backbone_config, batch_size=batch_size // processes.count)
        return None, processes, config
    memory_kind = backbone_config["memory_options"].get("memory_kind")
    if backbone_config["memory_layer_indices"] and memory_kind == "scann":
        raise ValueError(
            "--data-parallel cannot use --memory-kind scann on JAX: a ScaNN "
            "memory's searchers are called back on one host, which a step "
            "spread over devices does not do correctly. Use --memory-kind "
            "exact or auto (auto picks the in-graph exact memory there)."
        )
    devices = list(devices or keras.distribution.list_devices())
    check_divides(batch_size, len(devices), "devices")
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=MemorizingTransformerBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    return distribution, Processes(), backbone_config


def check_divides(batch_size, count, what):
    if batch_size % count:
        raise ValueError(
            f"--data-parallel: the batch size ({batch_size} lanes) must divide "
            f"by the number of {what} ({count}); choose --batch-size as a "
            f"multiple of {count}."
        )


def start_torch_processes():
    """Joins the process group `torchrun` set up (gloo on CPUs, NCCL on
    GPUs) and returns this process's `Processes`."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--data-parallel on torch runs one process per device: launch it "
            "with `torchrun --nproc-per-node <devices> -m recipes.train "
            "--data-parallel ...` (docs/scaling.md)."
        )
    import torch
    import torch.distributed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size())


class Processes:
    """The processes of a run: this one alone, or one per device (torch).

    Each of `count` processes trains a model of its share of the lanes on
    those lanes of the stream (`lanes`). `synchronise` makes their steps
    one step: it starts every process from process 0's weights and sums
    the gradients, of a loss divided by the global count of real tokens
    (`TokenLoss`), so each step equals the single-device step;
    `global_logs` gives the metrics over every process's lanes. Process 0
    writes the run's files; each process writes its own lanes' state into
    a checkpoint (`lane_states/process-<index>`).

    Attributes:
        index: int, this process's rank (0 alone).
        count: int, the number of processes (1 alone).
    """

    def __init__(self, index=0, count=1):
        self.index, self.count = index, count

    @property
    def is_main(self):
        """Whether this process writes the run's shared files."""
        return self.index == 0

    def barrier(self):
        if self.count > 1:
            import torch.distributed

            torch.distributed.barrier()

    def broadcast(self, value):
        """Process 0's `value` (a picklable object), in every process."""
        if self.count == 1:
            return value
        import torch.distributed

        values = [value]
        torch.distributed.broadcast_object_list(values, src=0)
        return values[0]

    def sum(self, values):
        """The sum over the processes of a list of floats."""
        if self.count == 1:
            return list(values)
        import torch
        import torch.distributed

        tensor = torch.tensor(list(values), dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def lanes(self, stream):
        """This process's lanes of a `LaneStreamer`'s batches."""
        return stream if self.count == 1 else LaneShard(stream, self.index, self.count)

    def lane_states(self, checkpoint):
        """Where this process's lane states are in a checkpoint directory."""
        directory = checkpoint / "lane_states"
        return directory if self.count == 1 else directory / f"process-{self.index}"

    def synchronise(self, causal_lm):
        """Copies process 0's weights into every process and sums each
        trainable weight's gradient over the processes as soon as
        backpropagation has accumulated it (torch `fit`): every optimizer
        then applies the same, global, gradient."""
        if self.count == 1:
            return
        import torch.distributed

        def all_reduce(parameter):
            torch.distributed.all_reduce(parameter.grad)

        for variable in causal_lm.trainable_variables:
            value = variable.value.detach().clone()
            torch.distributed.broadcast(value, src=0)
            variable.assign(value)
            variable.value.register_post_accumulate_grad_hook(all_reduce)

    def global_logs(self, model, logs):
        """`logs` with each metric of `model` over every process's lanes.

        A weighted mean (accuracy, token NLL) is the sum of every process's
        totals over the sum of their counts; the loss, whose value in each
        process is its share of the global loss (`TokenLoss`), is the sum
        of the processes' values.
        """
        if self.count == 1:
            return logs
        loss, *metrics = model.metrics  # the loss tracker, then compile_metrics
        means = [m for metric in metrics for m in getattr(metric, "metrics", [metric])]
        local = [float(loss.result())]
        for mean in means:
            local += [float(mean.total.value), float(mean.count.value)]
        summed = self.sum(local)
        logs = dict(logs, loss=summed[0])
        for i, mean in enumerate(means):
            total, count = summed[1 + 2 * i : 3 + 2 * i]
            logs[mean.name] = total / count if count else 0.0
        return logs


SINGLE = Processes()  # a run of one process


class LaneShard(keras.utils.PyDataset):
    """Lanes `[index * n, (index + 1) * n)` of every batch of a stream of
    `count * n` lanes: one process's share of a data-parallel stream."""

    def __init__(self, stream, index, count):
        super().__init__()
        check_divides(stream.batch_size, count, "processes")
        self.stream = stream
        lanes = stream.batch_size // count
        self.rows = slice(index * lanes, (index + 1) * lanes)

    @property
    def num_batches(self):
        return self.stream.num_batches

    def __getitem__(self, index):
        return keras.tree.map_structure(lambda x: x[self.rows], self.stream[index])


class GlobalLogs(keras.callbacks.Callback):
    """Puts the metrics over every process's lanes (`Processes.global_logs`)
    into the logs that the callbacks after it see, every step and epoch."""

    def __init__(self, processes):
        super().__init__()
        self.processes = processes

    def on_train_batch_end(self, batch, logs=None):
        logs.update(self.processes.global_logs(self.model, logs))

    def on_epoch_end(self, epoch, logs=None):
        logs.update(self.processes.global_logs(self.model, logs))


@keras.saving.register_keras_serializable(package="recipes")
class TokenLoss(keras.losses.Loss):
    """Cross-entropy per real token, averaged over the tokens of every
    process: this process's sum divided by the global count of real tokens
    (its sample weights), so that the processes' gradients sum to the
    single-device gradient. Alone, it is the model's default loss."""

    def __init__(self, name="token_loss", **kwargs):
        super().__init__(name=name, reduction="sum", **kwargs)

    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        total = super().__call__(y_true, y_pred, sample_weight)
        if sample_weight is None:
            sample_weight = ops.ones(ops.shape(y_true))
        tokens = ops.sum(ops.cast(sample_weight, total.dtype))
        if keras.backend.backend() == "torch":
            import torch.distributed

            if torch.distributed.is_initialized():
                tokens = tokens.clone()
                torch.distributed.all_reduce(tokens)
        return total / ops.maximum(tokens, 1.0)

"""torch `--data-parallel`: one process per device, launched by `torchrun`.

Each process builds a model of its share of the lanes and reads those lanes
of the stream; its memories, ScaNN's included, hold its own lanes only. The
processes' gradients are summed, so every step equals the single-device
step.
"""

import os

import keras
from keras import ops

from recipes.processes import Processes


def start_torch_processes():
    """Joins the process group `torchrun` set up (gloo on CPUs, NCCL on
    GPUs) and returns this process's `TorchProcesses`."""
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
    return TorchProcesses(
        torch.distributed.get_rank(), torch.distributed.get_world_size()
    )


class TorchProcesses(Processes):
    """The `torchrun` processes of a run, each with a model of its lanes.

    Each of `count` processes trains a model of its share of the lanes on
    those lanes of the stream. `synchronise` makes their steps one step: it
    starts every process from process 0's weights and sums the gradients,
    of a loss divided by the global count of real tokens (`TokenLoss`), so
    each step equals the single-device step; `global_logs` gives the
    metrics over every process's lanes.

    Args:
        index: int, this process's rank.
        count: int, the number of processes.
    """

    def barrier(self):
        import torch.distributed

        torch.distributed.barrier()

    def broadcast(self, value):
        import torch.distributed

        values = [value]
        torch.distributed.broadcast_object_list(values, src=0)
        return values[0]

    def sum(self, values):
        """The sum over the processes of a list of floats."""
        import torch
        import torch.distributed

        tensor = torch.tensor(list(values), dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def model_lanes(self, batch_size):
        return batch_size // self.count

    def stream_lanes(self, model_lanes):
        return model_lanes * self.count

    def loss(self):
        return TokenLoss()

    def callbacks(self):
        return [GlobalLogs(self)]

    def synchronise(self, causal_lm):
        """Copies process 0's weights into every process and sums each
        trainable weight's gradient over the processes as soon as
        backpropagation has accumulated it (torch `fit`): every optimizer
        then applies the same, global, gradient."""
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

"""The processes of a run: one, or several that train as one.

`Processes` is a run of one process, and the interface of the runs of
several (`recipes.data_parallel`): torch's, one process per device with its
own model (`recipes.torch_processes`), and JAX's on several hosts, one
process per host sharing one global model (`recipes.jax_processes`).
"""

import contextlib

import keras


class Processes:
    """The processes of a run: this one alone, or one of `count`.

    Every process reads its share of the lanes of the stream (`lanes`);
    process 0 writes the run's files and each process writes its own
    lanes' state into a checkpoint (`lane_states`). This class is a run of
    one process: its collectives do nothing. `TorchProcesses` and
    `JaxProcesses` make several processes train as one.

    Args:
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
        """Waits until every process is here."""

    def broadcast(self, value):
        """Process 0's `value` (a picklable object), in every process."""
        return value

    def alone(self):
        """A context for what process 0 does alone (writing the run's
        files): no step of it may wait for the other processes."""
        return contextlib.nullcontext()

    def model_lanes(self, batch_size):
        """The lanes of this process's model in a run of `batch_size` lanes."""
        return batch_size

    def stream_lanes(self, model_lanes):
        """The lanes of the stream every process reads (`lanes` gives each
        its share), for models of `model_lanes` lanes."""
        return model_lanes

    def lanes(self, stream):
        """This process's lanes of a `LaneStreamer`'s batches."""
        return stream if self.count == 1 else LaneShard(stream, self.index, self.count)

    def lane_states(self, checkpoint):
        """Where this process's lane states are in a checkpoint directory."""
        directory = checkpoint / "lane_states"
        return directory if self.count == 1 else directory / f"process-{self.index}"

    def loss(self):
        """The training loss of this process's model."""
        return "auto"

    def callbacks(self):
        """The `fit` callbacks that put every process's metrics in the logs
        (before any callback that reads them)."""
        return []

    def synchronise(self, causal_lm):
        """Makes the processes' models train as one (see the subclasses)."""

    def global_logs(self, model, logs):
        """`logs` with each metric of `model` over every process's lanes."""
        return logs


SINGLE = Processes()  # a run of one process


class LaneShard(keras.utils.PyDataset):
    """Lanes `[index * n, (index + 1) * n)` of every batch of a stream of
    `count * n` lanes: one process's share of a data-parallel stream."""

    def __init__(self, stream, index, count):
        super().__init__()
        if stream.batch_size % count:
            raise ValueError(
                f"{stream.batch_size} lanes do not split into {count} processes."
            )
        self.stream = stream
        lanes = stream.batch_size // count
        self.rows = slice(index * lanes, (index + 1) * lanes)

    @property
    def num_batches(self):
        return self.stream.num_batches

    def __getitem__(self, index):
        return keras.tree.map_structure(lambda x: x[self.rows], self.stream[index])

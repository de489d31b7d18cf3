"""A keras-hub preset directory, written whole."""

import os
import re

from keras_hub.src.utils import preset_utils

from keras_memtrans.memory.atomic_files import atomic_directory

# The files keras-hub's preset saver writes at the top of a preset (besides
# its `assets/` directory), sharded weights included.
PRESET_FILE = re.compile(
    r"(config|metadata|task|preprocessor|tokenizer|model\.weights)\.json"
    r"|model(_\d+)?\.weights\.h5"
)


def save_task_preset(task, preset_dir, max_shard_size):
    """Saves the keras-hub `task` (with its backbone and preprocessor) as
    the preset `preset_dir`, through `atomic_directory`: a save that fails
    or is killed leaves what was there.

    Raises:
        FileExistsError: `preset_dir` exists and holds anything but a
            preset's own files, which the save would delete.
    """
    if os.path.exists(preset_dir) and not holds_a_preset_only(preset_dir):
        raise FileExistsError(
            f"{preset_dir} holds files that are not a preset's: a preset is "
            "replaced whole, so it is not saved there."
        )

    def write(directory):
        saver = preset_utils.get_preset_saver(directory)
        saver.save_task(task, max_shard_size=max_shard_size)

    atomic_directory(preset_dir, write)


def holds_a_preset_only(directory):
    """Whether `directory` is a directory holding nothing but a keras-hub
    preset's own files (or nothing)."""
    if not os.path.isdir(directory):
        return False
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "assets":
                return False
        elif not PRESET_FILE.fullmatch(entry.name):
            return False
    return True

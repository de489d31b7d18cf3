import re

import pytest

from recipes import memory_budget


def test_a_tiny_preset_slot_costs_its_two_memories_and_its_scores():
    config = memory_budget.get_preset("tiny")["backbone"]
    _, per_slot = memory_budget.bytes_per_lane(config, 512)
    heads, head_dim, segment = 2, 16, 32  # the tiny preset, one memory layer
    memories = 2 * (2 * heads * head_dim * 4 + 4)  # keys, values, a position
    assert per_slot == memories + heads * segment * 4


def test_a_lane_also_holds_a_segment_of_spare_slots_in_each_memory():
    config = memory_budget.get_preset("tiny")["backbone"]
    fixed, _ = memory_budget.bytes_per_lane(config, 512)
    no_memory, _ = memory_budget.bytes_per_lane(
        dict(config, memory_layer_indices=()), 512
    )
    heads, head_dim, segment = 2, 16, 32
    assert fixed - no_memory == segment * 2 * (2 * heads * head_dim * 4 + 4)


@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_the_largest_memory_fits_and_one_slot_more_does_not(lanes):
    fixed, lane_fixed, per_slot, capacity = 3e9, 0.7e9, 32776, 80e9
    slots = memory_budget.largest_memory(
        capacity, lanes, fixed, lane_fixed, per_slot, 0.1
    )

    def total(memory_size):
        return fixed + lanes * (lane_fixed + per_slot * memory_size)

    assert total(slots) <= 0.9 * capacity < total(slots + 1)
    assert memory_budget.largest_memory(1e9, lanes, fixed, 0, per_slot, 0.1) == 0


def test_the_budget_table_has_a_row_per_device_and_lane_count(capsys):
    memory_budget.main(["--preset", "tiny", "--lanes-per-device", "1", "2"])
    output = capsys.readouterr().out
    rows = re.findall(r"^\| (.+) \| (\d+) \| ([\d,]+) \|$", output, re.MULTILINE)
    assert [(device, lanes) for device, lanes, _ in rows] == [
        (device, lanes) for device in memory_budget.DEVICES for lanes in ("1", "2")
    ]
    sizes = [int(size.replace(",", "")) for *_, size in rows]
    assert sizes[0] > sizes[1] > 0  # two lanes share the device

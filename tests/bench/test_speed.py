import pytest
import torch

from flatmin.bench.speed import format_table, measure_case
from flatmin.bench.workload import CASES, MethodRunner, SpeedCase

TINY = SpeedCase("cnn1d-tiny", "cnn1d", (1, 40), 10, 4_000, batch_size=16, steps=2)


@pytest.fixture(scope="module")
def rows():
    return measure_case(TINY, ["sgd", "sam", "saf", "mesa"], repeats=1)


def test_rows_are_well_formed(rows):
    assert [r.method for r in rows] == ["sgd", "sam", "saf", "mesa"]
    for r in rows:
        assert r.case == "cnn1d-tiny"
        assert len(r.blocks) == len(r.cpu_blocks) == 1
        assert r.blocks[0] > 0 and r.cpu_blocks[0] > 0
        assert r.images_per_s == r.blocks[0]
        # With one round every ratio is this block over SGD's block.
        assert r.median_round_ratio == pytest.approx(r.blocks[0] / rows[0].blocks[0])
        assert r.best_block_ratio == pytest.approx(r.blocks[0] / rows[0].blocks[0])
        assert r.cpu_round_ratio == pytest.approx(r.cpu_blocks[0] / rows[0].cpu_blocks[0])
    sgd = rows[0]
    assert sgd.median_round_ratio == sgd.best_block_ratio == sgd.cpu_round_ratio == 1.0


def test_extra_memory_is_counted_from_tensor_sizes(rows):
    # cnn1d on (1, 40): three 25-channel convolutions and a linear layer, no buffers.
    # Lengths 40 → 19 → 10 → 5, so 5,210 parameters (the MNIST-1D paper's count).
    params = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (25 * 5 * 10 + 10)
    by = {r.method: r for r in rows}
    assert by["sgd"].parameter_bytes == 4 * params
    assert by["sgd"].extra_memory_bytes == 0
    assert by["sam"].extra_memory_bytes == 4 * params  # the copy of w between the passes
    assert by["mesa"].extra_memory_bytes == 4 * params  # the EMA teacher
    # SAF: N·C·Ẽ float16 logits + N·Ẽ int32 epoch stamps, N = 4,000, C = 10, Ẽ = 3.
    assert by["saf"].extra_memory_bytes == 4_000 * 10 * 3 * 2 + 4_000 * 3 * 4


def test_table_places_ours_next_to_the_paper(rows):
    table = format_table(rows)
    assert "49.3 %" in table and "99.1 %" in table and "85.2 %" in table
    sam_line = next(line for line in table.splitlines() if "| sam |" in line)
    verdict = sam_line.split("|")[8]
    assert verdict.count("met") + verdict.count("MISSED") == 2


def test_speed_cases_cover_the_three_models():
    assert {c.model for c in CASES.values()} == {"resnet18", "cnn", "cnn1d"}
    assert CASES["resnet18"].input_shape == (3, 32, 32)


def test_sgd_is_required_and_weights_are_independent():
    with pytest.raises(ValueError, match="'sgd'"):
        measure_case(TINY, ["sam"], repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        measure_case(TINY, ["sgd"], repeats=0)


def test_each_method_trains_its_own_copy():
    from flatmin.train.models import build_model

    base = build_model("cnn1d", 10, (1, 40))
    before = [p.detach().clone() for p in base.parameters()]
    runner = MethodRunner(TINY, "saf", base)
    assert runner.epoch == 3  # SAF's store was filled for Ẽ = 3 epochs before timing
    runner.block()
    assert all(torch.equal(a, p) for a, p in zip(before, base.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(before, runner.model.parameters()))


def test_channels_last_inputs_change_only_the_layout_of_image_batches():
    from flatmin.train.models import build_model

    image = SpeedCase("cnn-tiny", "cnn", (3, 16, 16), 10, 60_000, batch_size=4, steps=1)
    base = build_model("cnn", 10, (3, 16, 16))
    nchw = MethodRunner(image, "sgd", base)
    channels_last = MethodRunner(
        SpeedCase(**{**image.__dict__, "channels_last_inputs": True}), "sgd", base
    )
    assert nchw.x.is_contiguous() and not nchw.x.is_contiguous(memory_format=torch.channels_last)
    assert channels_last.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw.x, channels_last.x)
    # 3-D batches (MNIST-1D) have no channels_last layout and stay as they are.
    flat = MethodRunner(SpeedCase(**{**TINY.__dict__, "channels_last_inputs": True}), "sgd", base)
    assert flat.x.is_contiguous()

import pytest

from flatmin.bench.memory import peak_rss_bytes
from flatmin.bench.workload import SpeedCase

# ResNet-18 (11.2 M float32 parameters, ~43 MiB) at batch 2: the copy of w that SAM keeps
# between its passes dwarfs both the activations and the allocator's slack.
RESNET = SpeedCase("resnet18-tiny", "resnet18", (3, 32, 32), 10, 64, batch_size=2, steps=1)


@pytest.mark.slow
def test_peak_extra_memory_of_sam_is_one_copy_of_the_weights():
    from flatmin.train.models import build_model

    weights = sum(p.numel() * 4 for p in build_model("resnet18", 10, (3, 32, 32)).parameters())
    # Medians of 5 processes each. The allocator's slack differs from process to process,
    # SGD's own peak included (4.5x to 5.0x the weights): medians of 3 gave SAM − SGD from
    # 0.69x to 2.0x the weights. The lower bound only tells a measurement that sees SAM's
    # copy of w from one that sees none.
    sgd, sam = peak_rss_bytes(RESNET, "sgd", repeats=5), peak_rss_bytes(RESNET, "sam", repeats=5)
    # SGD's own rise: the trained copy of the model, its gradients and momentum at least.
    assert sgd > 3 * weights
    # SAM: the copy of w, plus what the allocator keeps between the passes.
    assert 0.4 * weights < sam - sgd < 3 * weights


def test_a_failing_measurement_says_which_method_and_why():
    with pytest.raises(RuntimeError, match="'no-such-method' on resnet18-tiny"):
        peak_rss_bytes(RESNET, "no-such-method")

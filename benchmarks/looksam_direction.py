"""How far LookSAM's reuse assumption holds: the size and drift of SAM's orthogonal part g_v.

LookSAM (Liu et al., CVPR 2022) reuses ``g_v = g_s − (⟨g,g_s⟩/‖g‖²)·g`` for k − 1 steps,
rescaled to ``α‖g‖`` (α = 0.7). This runs plain SAM (ρ = 0.05) on the MNIST-1D CNN with
40 % label noise and prints ``‖g_v‖/‖g‖`` (how big SAM's own orthogonal part is) and the
cosine between consecutive steps' ``g_v`` (how slowly it changes).

    python benchmarks/looksam_direction.py --steps 30
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from flatmin import SAM
from flatmin.train.data import load_dataset, make_loader
from flatmin.train.models import build_model


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset("mnist1d", seed=args.seed, label_noise=0.4)
    model = build_model("cnn1d", data.num_classes, data.input_shape)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
              weight_decay=5e-4)  # fmt: skip
    ratios, cosines, previous = [], [], None
    for step, (x, y) in enumerate(make_loader(data.train, 128, True, args.seed)):
        if step == args.steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = flat([p.grad for p in model.parameters()]).clone()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        g_s = flat([p.grad for p in model.parameters()]).clone()
        g_v = g_s - (g @ g_s) / (g @ g) * g
        ratios.append((g_v.norm() / g.norm()).item())
        if previous is not None:
            cosines.append(F.cosine_similarity(g_v, previous, dim=0).item())
        previous = g_v
        opt.second_step(zero_grad=True)
    print(f"SAM steps: {len(ratios)} (MNIST-1D CNN, 40 % label noise, rho 0.05, batch 128)")
    print(f"||g_v|| / ||g||: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); LookSAM's reuse uses 0.7")  # fmt: skip
    print(f"cos(g_v(t), g_v(t-1)): median {statistics.median(cosines):.3f}")


if __name__ == "__main__":
    main()

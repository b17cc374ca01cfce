"""How well the dropped tokens are rebuilt: learned top-K against random K, on held-out
images streamed chunk by chunk (``stream.chunks``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.policy import keep_count
from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import TokenSelector
from vllm_tokenprune.training.reconstruction import TokenReconstructor, image_dropped_mse
from vllm_tokenprune.training.stream import FeatureSet, chunks, num_images

EVAL_RATIOS = (0.1, 0.25, 0.5)
RANDOM_DRAWS = 5  # random selections averaged per image in the final comparison


def autocast(device: torch.device):
    """bfloat16 autocast for selector and reconstructor on CUDA; nothing elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def mask_from_indices(indices: torch.Tensor | Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Keep mask (B, num_tokens): 1.0 at each row's indices, (B, K) or one (K_b,) per row."""
    if torch.is_tensor(indices):
        mask = torch.zeros(indices.shape[0], num_tokens, device=indices.device)
        return mask.scatter_(1, indices, 1.0)
    return torch.stack([mask_from_indices(row[None], num_tokens)[0] for row in indices])


@torch.no_grad()
def evaluate(
    selector: TokenSelector,
    reconstructor: TokenReconstructor,
    features: FeatureSet,
    ratios=EVAL_RATIOS,
    random_draws: int = RANDOM_DRAWS,
    seed: int = 0,
    chunk: int = 64,
) -> dict[str, dict[str, float]]:
    """Per keep ratio: the MSE over dropped (normalized) tokens after learned top-K and after
    random K, each image's mean averaged over images, on the selector's device. Each image
    keeps K = keep_count(N_i, ratio) of its own N_i, as served; "k" is the mean K."""
    selector.eval()
    reconstructor.eval()
    device = selector.feature_mean.device
    gen = torch.Generator().manual_seed(seed)
    n = num_images(features)
    results = {}
    for ratio in ratios:
        learned = random = k_total = 0.0
        for part in chunks(features, chunk):
            batch = part.to(device).padded()
            lengths = batch.lengths
            ks = [keep_count(length, ratio) for length in lengths]
            k_total += sum(ks)
            with autocast(device):
                target = selector.normalize(batch.x)
                width = batch.x.shape[1]

                def error(keep: torch.Tensor) -> float:
                    """Summed over the chunk's images, so that chunking never changes the mean."""
                    recon = reconstructor(target, keep, batch.grids, batch.padding)
                    return image_dropped_mse(recon, target, keep, batch.padding).sum().item()

                learned += error(mask_from_indices(topk_sorted(selector.scores(batch.x, batch.padding), ks), width))
                # Drawn image by image, so each image's random masks do not depend on the chunking.
                noise = [torch.rand(random_draws, length, generator=gen).to(device) for length in lengths]
                for draw in range(random_draws):
                    picks = [topk_sorted(image[draw], k) for image, k in zip(noise, ks)]
                    random += error(mask_from_indices(picks, width)) / random_draws
        results[str(ratio)] = {"k": k_total / n, "learned": learned / n, "random": random / n}
    return results


def format_report(results: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, "keep  K     learned  random  learned/random"]
    for ratio, r in results.items():
        lines.append(f"{float(ratio):<5} {r['k']:<5.4g} {r['learned']:.4f}   {r['random']:.4f}  "
                     f"{r['learned'] / r['random']:.3f}")
    return "\n".join(lines)

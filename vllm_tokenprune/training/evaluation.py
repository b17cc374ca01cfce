"""How well the dropped tokens are rebuilt: learned top-K against random K, on held-out
images streamed chunk by chunk (``stream.chunks``)."""

from __future__ import annotations

import torch

from vllm_tokenprune.selection.methods.topk import topk_sorted
from vllm_tokenprune.selection.selector import TokenSelector
from vllm_tokenprune.serving.policy import keep_count
from vllm_tokenprune.training.reconstruction import TokenReconstructor, dropped_mse
from vllm_tokenprune.training.stream import FeatureSet, chunks, num_images

EVAL_RATIOS = (0.1, 0.25, 0.5)
RANDOM_DRAWS = 5  # random selections averaged per image in the final comparison


def autocast(device: torch.device):
    """bfloat16 autocast for selector and reconstructor on CUDA; nothing elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def mask_from_indices(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask = torch.zeros(indices.shape[0], num_tokens, device=indices.device)
    return mask.scatter_(1, indices, 1.0)


@torch.no_grad()
def evaluate(
    selector: TokenSelector,
    reconstructor: TokenReconstructor,
    features: FeatureSet,
    grid: list[int] | None,
    ratios=EVAL_RATIOS,
    random_draws: int = RANDOM_DRAWS,
    seed: int = 0,
    chunk: int = 64,
) -> dict[str, dict[str, float]]:
    """MSE over dropped (normalized) tokens after learned top-K vs random K, per keep ratio,
    on the selector's device."""
    selector.eval()
    reconstructor.eval()
    device = selector.feature_mean.device
    gen = torch.Generator().manual_seed(seed)
    n, num_tokens = num_images(features), features.num_tokens
    results = {}
    for ratio in ratios:
        k = keep_count(num_tokens, ratio)
        learned = random = 0.0
        for x in chunks(features, chunk):
            x = x.to(device)
            with autocast(device):
                target = selector.normalize(x)
                mask = mask_from_indices(topk_sorted(selector.scores(x), k), num_tokens)
                # Every image drops N - K tokens, so chunk means weighted by chunk size are exact.
                learned += dropped_mse(reconstructor(target, mask, grid), target, mask).item() * len(x)
                # Drawn image by image, so each image's random masks do not depend on the chunking.
                noise = torch.rand(len(x), random_draws, num_tokens, generator=gen).to(device)
                for draw in range(random_draws):
                    mask = mask_from_indices(topk_sorted(noise[:, draw], k), num_tokens)
                    random += (dropped_mse(reconstructor(target, mask, grid), target, mask).item()
                               * len(x) / random_draws)
        results[str(ratio)] = {"k": k, "learned": learned / n, "random": random / n}
    return results


def format_report(results: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, "keep  K     learned  random  learned/random"]
    for ratio, r in results.items():
        lines.append(f"{float(ratio):<5} {r['k']:<5} {r['learned']:.4f}   {r['random']:.4f}  "
                     f"{r['learned'] / r['random']:.3f}")
    return "\n".join(lines)

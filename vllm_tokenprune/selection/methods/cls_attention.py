"""[CLS]-attention top-K (FasterVLM: Zhang et al., "[CLS] Attention is All You Need for
Training-Free Visual Token Pruning", arXiv 2412.01818, its method section; the
importance criterion VisPruner (ICCV 2025) builds on).

The [CLS] token's attention in the layer whose output the model uses, averaged over heads,
ranks the image tokens; the top K are kept as they are. Towers without a [CLS] token
(SigLIP, the Qwen towers) rank by the attention each token receives from all queries.
"""

from __future__ import annotations

from vllm_tokenprune.selection.methods import ATTENTION, LATE, Method, Probe
from vllm_tokenprune.selection.methods.batch import padded
from vllm_tokenprune.selection.methods.scores import top_k

SCORE = Probe(ATTENTION, LATE)

cls_attention = Method("cls_attention", top_k(lambda batch, mask: padded([t.stats[SCORE].float() for t in batch])),
                       needs=frozenset({SCORE}))

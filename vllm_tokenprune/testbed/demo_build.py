"""What the demo model is, apart from its training: a word-level tokenizer over every word
of the testbed's questions and answers, LLaVA-1.5's processor and chat template at the task's
image size, the LLaVA config of a ``DemoConfig``'s sizes, and the prompt pieces around the
image placeholder (``testbed/demo_model.py`` trains it)."""

from __future__ import annotations

from vllm_tokenprune.testbed import clutter, synthetic
from vllm_tokenprune.testbed.synthetic import TASK_IMAGE_SIZE, TASK_PATCH

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def vocabulary() -> list[str]:
    """Specials first, then every word of the template, the questions and the answers."""
    words = ["user", "assistant", ":"]
    questions = [*synthetic.QUESTIONS.values(),
                 *(q.format(shape=k) for q in clutter.QUESTIONS.values() for k in synthetic.SHAPES)]
    answers = [*clutter.COUNT_WORDS, *synthetic.TASK_COLOURS, *clutter.DIGITS]
    for word in [w for q in questions for w in q.split()] + answers:
        if word not in words:
            words.append(word)
    return [*SPECIALS, *words]


def build_processor():
    """LlavaProcessor: CLIP preprocessing at the task's image size, a word-level tokenizer
    (lower-cased, punctuation split off; unknown words become <unk>), LLaVA-1.5's template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from vllm_tokenprune.testbed.tokenizers import vicuna_template

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    # The template writes bos itself and encoding adds none, so prompts have one bos
    # however a server tokenizes them.
    tokenizer.chat_template = vicuna_template("<image>")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TASK_IMAGE_SIZE},
        crop_size={"height": TASK_IMAGE_SIZE, "width": TASK_IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=TASK_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def build_config(cfg, tokenizer):
    """The LLaVA config of ``cfg``'s model sizes (a ``demo_model.DemoConfig``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=TASK_IMAGE_SIZE, patch_size=TASK_PATCH, projection_dim=cfg.text_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # 1/sqrt(width) (0.088 here), not the usual 0.02 that suits widths in the thousands:
        # at 0.02 the image-to-answer path is a product of near-zero matrices (measured: a
        # colour-only probe stayed at chance for 150 steps; at 0.088 it reached 86%).
        initializer_range=cfg.text_hidden ** -0.5,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS
        # The last layer: with LLaVA-1.5's -2 the top layer would never be trained.
        vision_feature_layer=-1,
        image_seq_length=(TASK_IMAGE_SIZE // TASK_PATCH) ** 2,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "float32"
    return config


class Prompts:
    """Token ids of chat prompts around the image placeholder, and of answers; cached per text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def pieces(self, question: str) -> tuple[list[int], list[int]]:
        """The prompt before and after the image placeholder."""
        if question not in self._pieces:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            before, after = text.split("<image>")
            self._pieces[question] = self.encode(before), self.encode(after)
        return self._pieces[question]

    def target(self, answer: str) -> list[int]:
        """What greedy decoding must produce: the answer's words, then </s>."""
        return [*self.encode(answer), self.tokenizer.eos_token_id]


def grow(model, config):
    """``model`` (a ``LlavaForConditionalGeneration``) grown into ``config``'s language model
    (wider, deeper, a wider MLP; the tower unchanged), computing exactly what ``model`` does:
    Net2Net's function-preserving growth (Chen et al., ICLR 2016) by zero extension. The added
    residual channels start at zero and nothing writes into them (the embeddings, the
    projector's last layer and every output and down projection are zero there); the added heads,
    MLP units and layers write nothing (their output projections start at zero, their inputs
    random, so that training moves them); the norms, whose mean now runs over more channels,
    are rescaled (weights by sqrt(old / new), eps by old / new) so that the old channels get
    exactly their old values. Training on then puts the added capacity to use."""
    import copy

    import torch
    from transformers import LlavaForConditionalGeneration

    old_text, new_text = model.config.text_config, config.text_config
    config = copy.deepcopy(config)
    ratio = old_text.hidden_size / new_text.hidden_size
    config.text_config.rms_norm_eps = old_text.rms_norm_eps * ratio
    grown = LlavaForConditionalGeneration(config).float()
    old, new = model.state_dict(), grown.state_dict()
    tower = {name for name in old if "vision_tower" in name}
    fits = tower == {name for name in new if "vision_tower" in name} and all(
        name in new and all(a <= b for a, b in zip(value.shape, new[name].shape))
        and (name not in tower or value.shape == new[name].shape) for name, value in old.items())
    if not fits or new_text.head_dim != old_text.head_dim:
        raise ValueError("a model grows only a wider, deeper language model with a wider MLP and heads as wide")
    with torch.no_grad():
        for name, value in new.items():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")) or \
                    "multi_modal_projector.linear_2" in name:
                value.zero_()
            if name in old:
                kept = tuple(slice(0, n) for n in old[name].shape)
                norm = "language_model" in name and "norm" in name
                value[kept] = old[name] * ratio ** 0.5 if norm else old[name]
    return grown.eval()

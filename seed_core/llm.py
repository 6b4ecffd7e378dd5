"""LLM side of SEED: image tokens in a causal LM's vocabulary, training examples, LoRA, decoding.

Design choices:
- One image is ``<img>`` + N image tokens + ``</img>`` (SEED: N = 32 codes from an 8192-entry
  codebook). The codes are added as ``<img_00000>``.. *before* ``<img>``/``</img>`` so that code
  k -> id ``len(text vocabulary) + k`` as in SEED-LLaMA; contiguous ids make code <-> id a single
  addition and let a logits processor mask a slice instead of an index list.
- New embedding rows are drawn by transformers' mean resizing under a fixed private seed, so a
  fresh base plus ``add_image_tokens`` always gives the same rows (an adapter reloads exactly even
  for rows it does not store) and the caller's RNG stream is left untouched.
- LoRA, not full fine-tuning (SEED-OPT2.7B, SEED-LLaMA). Instead of ``modules_to_save`` on the
  embeddings (whole-matrix copies, broken by OPT's tied lm_head) only the image-token rows train,
  through PEFT's ``trainable_token_indices``: with tied weights PEFT shares one row delta between
  the input embedding and the lm_head; untied models get both layers listed explicitly, since
  otherwise the output rows of the image tokens would never train.
- Loss only on the target: the caption (+ eos) for image-to-text, the 32 codes + ``</img>`` for
  text-to-image. Truncation (``max_length``) only ever shortens captions, never an image.
- Text-to-image decoding is forced with ``<img>`` and constrained so that it *always* yields N
  valid codes: the number of valid images is a property of the decoder, not of the model's luck.

Shapes: B batch, T sequence length, N image tokens per image (32), K codebook size, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_TO_TEXT_PROMPT = "A photo of"
TEXT_TO_IMAGE_PROMPT = "Generate an image"
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip

# Seed for the rows that resizing adds: fixed so that every process and every reload agrees.
_NEW_ROWS_SEED = 0
_OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def image_token(k: int) -> str:
    """Vocabulary string of image code ``k``, e.g. ``<img_00042>``."""
    return f"<img_{k:05d}>"


@dataclass(kw_only=True)
class LoraSettings:
    """How the LLM is adapted: LoRA on the attention projections plus the image-token rows."""

    r: int = 16
    """LoRA rank (SEED-LLaMA: 16)."""
    alpha: float = 32
    """LoRA scaling numerator; the update is scaled by alpha / r (SEED-LLaMA: 32)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input (SEED-LLaMA: 0.05)."""
    target_modules: list[str] | None = None
    """Linear layer names to adapt; None infers them (OPT: q,k,v,out_proj; LLaMA-style: q,k,v,o_proj)."""
    train_image_token_rows: bool = True
    """Train the embedding (and lm_head) rows of the image tokens; off leaves them at their init."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoraSettings.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraSettings.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not (
            self.target_modules and all(self.target_modules)
        ):
            raise ValueError(
                f"LoraSettings.target_modules must be None or non-empty names, got {self.target_modules!r}"
            )


@dataclass(frozen=True)
class ImageTokenSpace:
    """Where the image tokens live in the vocabulary; code k has id ``first_code_id + k``."""

    num_codes: int
    """Codebook size K (SEED: 8192)."""
    image_start_id: int
    """Id of ``<img>``."""
    image_end_id: int
    """Id of ``</img>``."""
    first_code_id: int
    """Id of ``<img_00000>``."""
    num_tokens_per_image: int = 32
    """Codes per image N (SEED: 32 causal queries)."""

    def __post_init__(self) -> None:
        for name in ("num_codes", "num_tokens_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageTokenSpace.{name} must be >= 1, got {getattr(self, name)}")
        codes = range(self.first_code_id, self.first_code_id + self.num_codes)
        for name in ("image_start_id", "image_end_id", "first_code_id"):
            if getattr(self, name) < 0 or (
                name != "first_code_id" and getattr(self, name) in codes
            ):
                raise ValueError(f"ImageTokenSpace.{name} must be >= 0 and outside the code ids")
        if self.image_start_id == self.image_end_id:
            raise ValueError("ImageTokenSpace.image_end_id must differ from image_start_id")

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in [0, K) of any shape -> vocabulary ids of the same shape."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes})")
        return codes.long() + self.first_code_id

    def is_code_id(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are image codes (not ``<img>``/``</img>``)."""
        ids = torch.as_tensor(ids)
        return (ids >= self.first_code_id) & (ids < self.first_code_id + self.num_codes)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of image codes -> codes in [0, K); ValueError on any other id."""
        ids = torch.as_tensor(ids)
        if not bool(self.is_code_id(ids).all()):
            raise ValueError("ids_to_codes got ids that are not image-code tokens")
        return ids.long() - self.first_code_id

    def all_token_ids(self) -> list[int]:
        """Ids of ``<img>``, ``</img>`` and every code, sorted ascending."""
        codes = range(self.first_code_id, self.first_code_id + self.num_codes)
        return sorted([self.image_start_id, self.image_end_id, *codes])


def add_image_tokens(
    tokenizer, model: PreTrainedModel, num_codes: int, *, num_tokens_per_image: int = 32
) -> ImageTokenSpace:
    """Add the image tokens to ``tokenizer``, grow ``model``'s (tied) embeddings, return the space.

    Idempotent: tokens already present are not added again and the embeddings only grow when the
    tokenizer outgrew them (OPT ships spare rows, so shrinking to ``len(tokenizer)`` would be wrong).
    """
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}")
    vocab = tokenizer.get_vocab()
    if image_token(num_codes) in vocab:
        raise ValueError(f"tokenizer already holds more than num_codes={num_codes} image tokens")
    code_tokens = [image_token(k) for k in range(num_codes)]
    # Codes first: code k -> text vocabulary size + k, as in SEED-LLaMA.
    tokenizer.add_tokens(code_tokens + [IMAGE_START, IMAGE_END], special_tokens=True)
    code_ids = tokenizer.convert_tokens_to_ids(code_tokens)
    first = code_ids[0]
    if code_ids != list(range(first, first + num_codes)):
        raise ValueError("image-code token ids are not contiguous; use a tokenizer without them")
    space = ImageTokenSpace(
        num_codes=num_codes,
        image_start_id=tokenizer.convert_tokens_to_ids(IMAGE_START),
        image_end_id=tokenizer.convert_tokens_to_ids(IMAGE_END),
        first_code_id=first,
        num_tokens_per_image=num_tokens_per_image,
    )
    weight: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
    if len(tokenizer) > weight.shape[0]:
        with _seeded(_NEW_ROWS_SEED, weight.device):
            model.resize_token_embeddings(len(tokenizer))  # ties lm_head again where tied
    assert max(space.all_token_ids()) < model.get_input_embeddings().weight.shape[0]  # type: ignore[index]
    return space


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    # A private RNG stream: reproducible for a given seed, and the caller's stream is untouched.
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _encode_prompt_and_caption(tokenizer, prompt: str, caption: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of the caption that follows it after one space.

    The caption ids are cut from the joint encoding so that they are exactly what the model sees
    (and must produce) when the caption continues the prompt in one string.
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    caption = caption.strip()
    if not caption:
        return prompt_ids, []
    joint = tokenizer.encode(f"{prompt} {caption}", add_special_tokens=False)
    if joint[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids) :]
    # A tokenizer merged across the boundary: fall back to encoding the caption on its own.
    return prompt_ids, tokenizer.encode(f" {caption}", add_special_tokens=False)


def _image_ids(codes, space: ImageTokenSpace) -> list[int]:
    ids_N = space.codes_to_ids(torch.as_tensor(codes).reshape(-1))
    if ids_N.numel() != space.num_tokens_per_image:
        raise ValueError(
            f"codes must hold {space.num_tokens_per_image} tokens, got {ids_N.numel()}"
        )
    return [space.image_start_id, *ids_N.tolist(), space.image_end_id]


def _example(input_ids: list[int], num_untargeted: int) -> dict[str, list[int]]:
    labels = [IGNORE_INDEX] * num_untargeted + input_ids[num_untargeted:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_image_to_text_example(
    codes, caption: str, tokenizer, space: ImageTokenSpace, *, max_length: int | None = None
) -> dict[str, list[int]]:
    """[bos] <img> codes </img> "A photo of" caption eos; loss on caption + eos only."""
    if tokenizer.eos_token_id is None:
        raise ValueError("image-to-text examples need a tokenizer with an eos token")
    prompt_ids, caption_ids = _encode_prompt_and_caption(tokenizer, IMAGE_TO_TEXT_PROMPT, caption)
    context = _bos(tokenizer) + _image_ids(codes, space) + prompt_ids
    if max_length is not None:
        budget = max_length - len(context) - 1  # room left for caption tokens before eos
        if budget < 0:
            raise ValueError(f"max_length={max_length} cannot hold the image and the prompt")
        caption_ids = caption_ids[:budget]
    return _example(context + caption_ids + [tokenizer.eos_token_id], len(context))


def build_text_to_image_example(
    codes, caption: str, tokenizer, space: ImageTokenSpace, *, max_length: int | None = None
) -> dict[str, list[int]]:
    """[bos] "Generate an image" caption <img> codes </img>; loss on codes + </img> only."""
    prompt_ids, caption_ids = _encode_prompt_and_caption(tokenizer, TEXT_TO_IMAGE_PROMPT, caption)
    image_ids = _image_ids(codes, space)
    head = _bos(tokenizer) + prompt_ids
    if max_length is not None:
        budget = max_length - len(head) - len(image_ids)
        if budget < 0:
            raise ValueError(f"max_length={max_length} cannot hold the prompt and the image")
        caption_ids = caption_ids[:budget]
    # <img> is context, not target: generation always forces it, so predicting it is wasted loss.
    # No eos after </img>: decoding stops there by construction (ImageCodeLogitsProcessor).
    context = head + caption_ids + image_ids[:1]
    return _example(context + image_ids[1:], len(context))


def collate_examples(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad examples into (B, T) LongTensors; padded labels are -100, padded mask 0."""
    if not examples:
        raise ValueError("collate_examples got no examples")
    length = max(len(e["input_ids"]) for e in examples)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, value in fill.items():
        rows = [e[key] + [value] * (length - len(e[key])) for e in examples]
        batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
    return batch


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _infer_target_modules(model: nn.Module) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for targets in (_OPT_TARGETS, _LLAMA_TARGETS):
        if set(targets) <= leaves:
            return list(targets)
    raise ValueError(
        "LoraSettings.target_modules: cannot infer the attention projections of "
        f"{type(model).__name__}; pass target_modules explicitly"
    )


def apply_lora(model: PreTrainedModel, settings: LoraSettings, space: ImageTokenSpace) -> PeftModel:
    """Wrap ``model`` with LoRA; only LoRA weights and the image-token rows stay trainable."""
    embeddings: nn.Embedding = model.get_input_embeddings()  # type: ignore[assignment]
    if max(space.all_token_ids()) >= embeddings.weight.shape[0]:
        raise ValueError("space ids exceed the model's embeddings; call add_image_tokens first")
    trainable_tokens: list[int] | dict[str, list[int]] | None = None
    if settings.train_image_token_rows:
        ids = space.all_token_ids()
        head = model.get_output_embeddings()
        if head is None or head.weight is embeddings.weight:
            # Tied (OPT): PEFT wraps the lm_head with the same row delta, so both stay in sync.
            trainable_tokens = ids
        else:
            # Untied (LLaMA): a bare list would only reach the input rows; the output rows of
            # the image tokens are what text-to-image has to learn, so list both layers.
            trainable_tokens = {
                _module_name(model, embeddings): ids,
                _module_name(model, head): ids,
            }
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or _infer_target_modules(model),
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(model, config)  # freezes everything that is not an adapter


class ImageCodeLogitsProcessor(LogitsProcessor):
    """Allow only image codes for the first N new tokens and only ``</img>`` after them."""

    def __init__(self, space: ImageTokenSpace, prompt_length: int) -> None:
        self.space = space
        self.prompt_length = prompt_length  # padded prompt length: new tokens start here

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:  # type: ignore[override]
        step = input_ids.shape[1] - self.prompt_length
        allowed = torch.full_like(scores, float("-inf"))  # (B, V)
        if step < self.space.num_tokens_per_image:
            codes = slice(self.space.first_code_id, self.space.first_code_id + self.space.num_codes)
            allowed[:, codes] = scores[:, codes]
        else:
            end = self.space.image_end_id
            allowed[:, end] = scores[:, end]
        return allowed  # type: ignore[return-value]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Dropout (LoRA's included) must be off while decoding; give the caller its mode back.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding keeps every prompt's last token at the same position, where decoding starts;
    # the mask lets the model derive position ids that ignore the padding.
    length = max(len(p) for p in prompts)
    ids = [[pad_id] * (length - len(p)) + p for p in prompts]
    mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    as_long = dict(dtype=torch.long, device=device)
    return torch.tensor(ids, **as_long), torch.tensor(mask, **as_long)  # (B, T) each


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer needs a pad or eos token for batched generation")
    return pad


def generate_caption(
    model: PreTrainedModel,
    tokenizer,
    space: ImageTokenSpace,
    codes: torch.Tensor,
    *,
    max_new_tokens: int = 30,
) -> list[str]:
    """Greedy captions for (B, N) codes; image tokens are suppressed, only new tokens decoded."""
    codes_BN = torch.as_tensor(codes)
    if codes_BN.dim() != 2:
        raise ValueError(f"codes must have shape (B, N), got {tuple(codes_BN.shape)}")
    prompt_ids = tokenizer.encode(IMAGE_TO_TEXT_PROMPT, add_special_tokens=False)
    prompts = [_bos(tokenizer) + _image_ids(row, space) + prompt_ids for row in codes_BN]
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompts, _pad_id(tokenizer), device)
    with _eval_mode(model):
        out_BT = model.generate(  # type: ignore[operator]  # GenerationMixin, untyped on PreTrainedModel
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=_pad_id(tokenizer),
            suppress_tokens=space.all_token_ids(),  # captions are text: no image tokens
        )
    # generate pads finished rows after eos; skipping special tokens drops both.
    new = tokenizer.batch_decode(out_BT[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [caption.strip() for caption in new]


def generate_image_codes(
    model: PreTrainedModel,
    tokenizer,
    space: ImageTokenSpace,
    captions: list[str],
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """(B, N) codes in [0, K) for ``captions``, forced with ``<img>`` and constrained to be valid.

    ``seed`` makes sampling reproducible without touching the caller's global RNG stream.
    """
    if not captions:
        raise ValueError("generate_image_codes got no captions")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    prompts = []
    for caption in captions:
        prompt_ids, caption_ids = _encode_prompt_and_caption(
            tokenizer, TEXT_TO_IMAGE_PROMPT, caption
        )
        prompts.append(_bos(tokenizer) + prompt_ids + caption_ids + [space.image_start_id])
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompts, _pad_id(tokenizer), device)
    num_new = space.num_tokens_per_image + 1  # N codes, then </img>
    # Sampling knobs are passed explicitly so the checkpoint's generation_config cannot add its own
    # (top_k=0 disables top-k); the mask runs before them, so top-k only ever sees valid codes.
    sampling = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0) if do_sample else {}
    processor = ImageCodeLogitsProcessor(space, prompt_length=input_ids.shape[1])
    with _eval_mode(model), _seeded(seed, device):
        out_BT = model.generate(  # type: ignore[operator]  # GenerationMixin, untyped on PreTrainedModel
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=do_sample,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            pad_token_id=_pad_id(tokenizer),
            logits_processor=LogitsProcessorList([processor]),
            **sampling,
        )
    new_BT = out_BT[:, input_ids.shape[1] :]
    assert new_BT.shape[1] == num_new and bool((new_BT[:, -1] == space.image_end_id).all())
    return space.ids_to_codes(new_BT[:, : space.num_tokens_per_image])  # (B, N)


def train_caption_tokenizer(
    captions: Iterable[str], *, vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``captions`` (for tiny presets: no tokenizer can be downloaded).

    Byte-level means every string encodes without ``<unk>``; the 256 byte symbols and the four
    specials (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3) come before any merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    backend = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)

"""Unit tests for seed_core.llm on a tiny random OPT (and LLaMA) with an in-process BPE tokenizer."""

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from seed_core import llm

CAPTIONS = [
    "a dog runs on the grass",
    "a cat sleeps on a sofa",
    "two birds fly over the sea at sunset",
    "a red car parked near a tree",
]
NUM_CODES = 16
N = 32  # image tokens per image


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return llm.train_caption_tokenizer(CAPTIONS, vocab_size=300)


def make_opt(vocab_size: int, seed: int = 0) -> transformers.OPTForCausalLM:
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.OPTForCausalLM(config)


def make_llama(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture
def tok_model_space():
    tokenizer = make_tokenizer()
    model = make_opt(len(tokenizer))
    space = llm.add_image_tokens(tokenizer, model, NUM_CODES)
    return tokenizer, model, space


def random_codes(num: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, NUM_CODES, (num, N), generator=torch.Generator().manual_seed(seed))


def t2i_batch(tokenizer, space) -> dict[str, torch.Tensor]:
    codes = random_codes(len(CAPTIONS))
    examples = [
        llm.build_text_to_image_example(c, cap, tokenizer, space) for c, cap in zip(codes, CAPTIONS)
    ]
    return llm.collate_examples(examples, tokenizer.pad_token_id)


def train_steps(model, batch, steps: int = 2) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


# --- image tokens ----------------------------------------------------------------------------


def test_add_image_tokens_is_idempotent_and_contiguous():
    """Adding the image tokens twice adds them once, with code k at id text_vocab + k."""
    tokenizer = make_tokenizer()
    text_vocab = len(tokenizer)
    model = make_opt(text_vocab)
    space = llm.add_image_tokens(tokenizer, model, NUM_CODES)
    size = len(tokenizer)
    again = llm.add_image_tokens(tokenizer, model, NUM_CODES)
    assert again == space
    assert size == len(tokenizer) == text_vocab + NUM_CODES + 2
    assert model.get_input_embeddings().weight.shape[0] == size
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert space.first_code_id == text_vocab
    ids = tokenizer.convert_tokens_to_ids([llm.image_token(k) for k in range(NUM_CODES)])
    assert ids == list(range(text_vocab, text_vocab + NUM_CODES))
    assert llm.image_token(42) == "<img_00042>"
    assert tokenizer.convert_tokens_to_ids(llm.IMAGE_START) == space.image_start_id
    assert tokenizer.convert_tokens_to_ids(llm.IMAGE_END) == space.image_end_id


def test_add_image_tokens_rejects_a_smaller_codebook_than_present():
    """A tokenizer that already holds more image tokens than num_codes is refused."""
    tokenizer = make_tokenizer()
    model = make_opt(len(tokenizer))
    llm.add_image_tokens(tokenizer, model, NUM_CODES)
    with pytest.raises(ValueError, match="num_codes"):
        llm.add_image_tokens(tokenizer, model, NUM_CODES // 2)


def test_add_image_tokens_keeps_spare_embedding_rows():
    """Embeddings larger than the grown tokenizer (OPT's spare rows) are not shrunk."""
    tokenizer = make_tokenizer()
    model = make_opt(len(tokenizer) + 100)
    llm.add_image_tokens(tokenizer, model, NUM_CODES)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) - NUM_CODES - 2 + 100


def test_new_rows_are_deterministic_and_leave_global_rng_alone():
    """Two identical bases get identical new rows and the global RNG state is not consumed."""
    rows = []
    for _ in range(2):
        tokenizer = make_tokenizer()
        model = make_opt(len(tokenizer))
        torch.manual_seed(123)
        state = torch.get_rng_state()
        space = llm.add_image_tokens(tokenizer, model, NUM_CODES)
        assert torch.equal(torch.get_rng_state(), state)
        rows.append(model.get_input_embeddings().weight[space.first_code_id :].detach().clone())
    assert torch.equal(rows[0], rows[1])


def test_codes_ids_round_trip_and_rejects_non_image_ids(tok_model_space):
    """codes -> ids -> codes is the identity; text, <img>, </img> ids and bad codes raise."""
    _, _, space = tok_model_space
    codes = random_codes(3)
    ids = space.codes_to_ids(codes)
    assert ids.shape == codes.shape and bool(space.is_code_id(ids).all())
    assert torch.equal(space.ids_to_codes(ids), codes)
    others = torch.tensor([0, space.first_code_id - 1, space.image_start_id, space.image_end_id])
    assert not bool(space.is_code_id(others).any())
    for bad in others.tolist():
        with pytest.raises(ValueError):
            space.ids_to_codes(torch.tensor([space.first_code_id, bad]))
    with pytest.raises(ValueError):
        space.codes_to_ids(torch.tensor([NUM_CODES]))
    assert len(space.all_token_ids()) == NUM_CODES + 2


def test_image_token_space_validates_fields():
    """An ImageTokenSpace whose <img> id lies among the codes raises naming the field."""
    with pytest.raises(ValueError, match="image_start_id"):
        llm.ImageTokenSpace(num_codes=4, image_start_id=11, image_end_id=20, first_code_id=10)


# --- examples -----------------------------------------------------------------------------------


def test_image_to_text_example_layout(tok_model_space):
    """Image-to-text is bos <img> 32 codes </img> prompt caption eos with loss on caption+eos only."""
    tokenizer, _, space = tok_model_space
    codes = random_codes(1)[0]
    ex = llm.build_image_to_text_example(codes, CAPTIONS[0], tokenizer, space)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"]) and all(ex["attention_mask"])
    assert ids[:2] == [tokenizer.bos_token_id, space.image_start_id]
    assert ids[2 : 2 + N] == space.codes_to_ids(codes).tolist()
    assert ids[2 + N] == space.image_end_id
    assert int(space.is_code_id(torch.tensor(ids)).sum()) == N
    prompt = tokenizer.encode(llm.IMAGE_TO_TEXT_PROMPT, add_special_tokens=False)
    start = 3 + N + len(prompt)
    assert ids[3 + N : start] == prompt
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[start:-1]).strip() == CAPTIONS[0]
    assert labels[:start] == [-100] * start and labels[start:] == ids[start:]


def test_text_to_image_example_layout(tok_model_space):
    """Text-to-image is bos prompt caption <img> 32 codes </img> with loss on codes + </img> only."""
    tokenizer, _, space = tok_model_space
    codes = random_codes(1)[0]
    ex = llm.build_text_to_image_example(codes, CAPTIONS[2], tokenizer, space)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1 : -N - 2]) == f"{llm.TEXT_TO_IMAGE_PROMPT} {CAPTIONS[2]}"
    assert ids[-N - 2] == space.image_start_id and ids[-1] == space.image_end_id
    assert ids[-N - 1 : -1] == space.codes_to_ids(codes).tolist()
    assert int(space.is_code_id(torch.tensor(ids)).sum()) == N
    target = N + 1
    assert labels[:-target] == [-100] * (len(ids) - target) and labels[-target:] == ids[-target:]


def test_max_length_truncates_only_the_caption(tok_model_space):
    """max_length shortens the caption, keeps the whole image, and refuses impossible lengths."""
    tokenizer, _, space = tok_model_space
    codes = random_codes(1)[0]
    for build in (llm.build_image_to_text_example, llm.build_text_to_image_example):
        full = build(codes, CAPTIONS[2], tokenizer, space)["input_ids"]
        short = build(codes, CAPTIONS[2], tokenizer, space, max_length=len(full) - 3)["input_ids"]
        assert len(short) == len(full) - 3
        assert int(space.is_code_id(torch.tensor(short)).sum()) == N
        with pytest.raises(ValueError, match="max_length"):
            build(codes, CAPTIONS[2], tokenizer, space, max_length=N)


def test_collate_right_pads_with_ignored_labels(tok_model_space):
    """Collation right-pads ids with pad, mask with 0 and labels with -100."""
    tokenizer, _, space = tok_model_space
    codes = random_codes(2)
    short = llm.build_image_to_text_example(codes[0], "a dog", tokenizer, space)
    long = llm.build_image_to_text_example(codes[1], CAPTIONS[2], tokenizer, space)
    batch = llm.collate_examples([short, long], tokenizer.pad_token_id)
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"]
    assert bool((batch["input_ids"][0, n:] == tokenizer.pad_token_id).all())
    assert bool((batch["labels"][0, n:] == -100).all())
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1].tolist() == long["labels"]


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("r", 0), ("alpha", 0), ("dropout", 1.0), ("target_modules", [])]
)
def test_lora_settings_validation_names_the_field(field, value):
    """An invalid LoraSettings field raises ValueError naming that field."""
    with pytest.raises(ValueError, match=field):
        llm.LoraSettings(**{field: value})


def test_target_modules_inference_refuses_unknown_architectures():
    """A model without q/k/v/out_proj or o_proj projections (GPT-2) needs explicit target_modules."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    space = llm.add_image_tokens(tokenizer, model, NUM_CODES)
    with pytest.raises(ValueError, match="target_modules"):
        llm.apply_lora(model, llm.LoraSettings(), space)


def test_apply_lora_trains_only_lora_and_image_rows(tok_model_space):
    """After apply_lora the trainable tensors are the LoRA A/B matrices and one image-row delta."""
    tokenizer, model, space = tok_model_space
    settings = llm.LoraSettings(r=4, alpha=8)
    peft_model = llm.apply_lora(model, settings, space)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n: p for n, p in trainable.items() if ".lora_A." in n or ".lora_B." in n}
    rows = {n: p for n, p in trainable.items() if "trainable_tokens_delta" in n}
    assert set(trainable) == set(lora) | set(rows)
    # 2 layers x {q,k,v,out}_proj x (A: r x 32 + B: 32 x r)
    assert len(lora) == 2 * 4 * 2 and sum(p.numel() for p in lora.values()) == 2 * 4 * 2 * 4 * 32
    assert [tuple(p.shape) for p in rows.values()] == [(NUM_CODES + 2, 32)]
    # The tied lm_head reads the same row delta as the input embedding.
    head = peft_model.get_output_embeddings()
    embed = peft_model.get_input_embeddings()
    assert head.token_adapter.trainable_tokens_delta is embed.token_adapter.trainable_tokens_delta


def test_apply_lora_without_image_rows_trains_only_lora(tok_model_space):
    """train_image_token_rows=False leaves only LoRA matrices trainable."""
    _, model, space = tok_model_space
    peft_model = llm.apply_lora(model, llm.LoraSettings(train_image_token_rows=False), space)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_training_step_changes_only_lora_and_image_rows(tok_model_space):
    """Optimizer steps on a text-to-image batch move LoRA and image rows, not base weights or text rows."""
    tokenizer, model, space = tok_model_space
    peft_model = llm.apply_lora(model, llm.LoraSettings(r=4, alpha=8, dropout=0.0), space)
    params = dict(peft_model.named_parameters())
    lora = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    (delta_name,) = [n for n in params if "trainable_tokens_delta" in n]
    base_q = next(n for n in params if n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    embed = peft_model.get_input_embeddings()
    text_ids = torch.arange(space.first_code_id)
    image_ids = torch.tensor(space.all_token_ids())
    before = {
        "delta": params[delta_name].detach().clone(),
        "base_q": params[base_q].detach().clone(),
        "base_embed": embed.token_adapter.base_layer.weight.detach().clone(),
        "text_rows": embed(text_ids).detach().clone(),
        "image_rows": embed(image_ids).detach().clone(),
    }
    # Two steps: LoRA B starts at zero, so A only receives a gradient from the second step on.
    train_steps(peft_model, t2i_batch(tokenizer, space), steps=2)
    for name, value in lora.items():
        assert not torch.equal(params[name], value), name
    assert bool((params[delta_name] != before["delta"]).any(dim=1).all())
    assert torch.equal(params[base_q], before["base_q"])
    assert torch.equal(embed.token_adapter.base_layer.weight, before["base_embed"])
    assert torch.equal(embed(text_ids), before["text_rows"])
    assert bool((embed(image_ids) != before["image_rows"]).any(dim=1).all())


def test_untied_head_trains_output_rows_of_image_tokens():
    """On an untied LLaMA the lm_head rows of image tokens train too, and o_proj is inferred."""
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer))
    space = llm.add_image_tokens(tokenizer, model, NUM_CODES)
    peft_model = llm.apply_lora(model, llm.LoraSettings(r=4, alpha=8, dropout=0.0), space)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("o_proj.lora_A" in n for n in names)
    deltas = [n for n in names if "trainable_tokens_delta" in n]
    assert len(deltas) == 2 and any("lm_head" in n for n in deltas)
    head = peft_model.get_output_embeddings()
    before = head.token_adapter.trainable_tokens_delta["default"].detach().clone()
    train_steps(peft_model, t2i_batch(tokenizer, space), steps=1)
    assert not torch.equal(head.token_adapter.trainable_tokens_delta["default"], before)


def test_adapter_save_and_reload_gives_identical_logits(tok_model_space, tmp_path):
    """A saved adapter reloaded onto a fresh extended base reproduces the trained logits exactly."""
    tokenizer, model, space = tok_model_space
    peft_model = llm.apply_lora(model, llm.LoraSettings(r=4, alpha=8), space)
    batch = t2i_batch(tokenizer, space)
    train_steps(peft_model, batch, steps=2)
    peft_model.eval()
    expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    # Space-efficient: LoRA matrices and the image-row delta only, no full embedding copy.
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in keys)

    fresh_tokenizer = make_tokenizer()
    base = make_opt(len(fresh_tokenizer))
    assert llm.add_image_tokens(fresh_tokenizer, base, NUM_CODES) == space
    base.eval()
    assert not torch.allclose(base(**batch).logits, expected)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path)
    reloaded.eval()
    assert torch.equal(reloaded(**batch).logits, expected)


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_image_codes_always_yields_valid_codes(tok_model_space, do_sample):
    """Untrained models still give (B, 32) codes in range, greedy and sampled, for ragged captions."""
    tokenizer, model, space = tok_model_space
    peft_model = llm.apply_lora(model, llm.LoraSettings(r=4, alpha=8), space)
    peft_model.train()
    captions = ["a dog", CAPTIONS[2], ""]
    kwargs = dict(do_sample=do_sample, temperature=0.7, top_k=5, seed=7) if do_sample else {}
    codes = llm.generate_image_codes(peft_model, tokenizer, space, captions, **kwargs)
    assert codes.shape == (3, N) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < NUM_CODES
    assert peft_model.training  # the caller's mode is restored
    if do_sample:
        again = llm.generate_image_codes(peft_model, tokenizer, space, captions, **kwargs)
        assert torch.equal(codes, again)


def test_generate_image_codes_left_padding_matches_unbatched(tok_model_space):
    """Greedy codes of a caption are the same alone as in a left-padded batch with a longer one."""
    tokenizer, model, space = tok_model_space
    batched = llm.generate_image_codes(model, tokenizer, space, ["a dog", CAPTIONS[2]])
    alone = llm.generate_image_codes(model, tokenizer, space, ["a dog"])
    assert torch.equal(batched[:1], alone)


def test_image_code_processor_masks_by_step():
    """The processor allows only code ids for the first N steps and only </img> afterwards."""
    space = llm.ImageTokenSpace(
        num_codes=4, image_start_id=14, image_end_id=15, first_code_id=10, num_tokens_per_image=2
    )
    processor = llm.ImageCodeLogitsProcessor(space, prompt_length=3)
    scores = torch.zeros(2, 20)
    for length, allowed in [(3, {10, 11, 12, 13}), (4, {10, 11, 12, 13}), (5, {15})]:
        out = processor(torch.zeros(2, length, dtype=torch.long), scores)
        assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == allowed


def test_generate_caption_returns_strings(tok_model_space):
    """generate_caption returns one string per code row."""
    tokenizer, model, space = tok_model_space
    captions = llm.generate_caption(model, tokenizer, space, random_codes(2), max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

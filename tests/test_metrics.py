"""jobs.metrics: retrieval recall and chance, pycocoevalcap caption scores, codebook statistics."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from jobs.metrics import (
    ImageCaptionIndex,
    Relevance,
    caption_scores,
    chance_at_k,
    codebook_stats,
    dedupe_captions,
    recall_at_k,
    retrieval_chance,
    retrieval_recall,
    tokenize,
)


def _hit_rate(sim_QC: torch.Tensor, relevant_QC: torch.Tensor, k: int) -> float:
    metric = RetrievalHitRate(top_k=k)
    query_QC = torch.arange(sim_QC.shape[0])[:, None].expand_as(sim_QC)
    return metric(sim_QC.reshape(-1), relevant_QC.reshape(-1), indexes=query_QC.reshape(-1)).item()


def random_ranking_recall(relevant_IT: np.ndarray, ks, *, trials: int,
                          rng: np.random.Generator) -> dict[str, float]:  # fmt: skip
    """Mean recall@k both ways over `trials` uniformly random rankings of an (I, T) relation."""
    sums = {f"{d}_r{k}": 0.0 for d in ("i2t", "t2i") for k in ks}
    for _ in range(trials):
        order_IT = np.argsort(rng.random(relevant_IT.shape), axis=1)  # random ranking per image
        order_TI = np.argsort(rng.random(relevant_IT.T.shape), axis=1)
        hit_IT = np.take_along_axis(relevant_IT, order_IT, axis=1)
        hit_TI = np.take_along_axis(relevant_IT.T, order_TI, axis=1)
        for k in ks:
            sums[f"i2t_r{k}"] += hit_IT[:, :k].any(axis=1).mean()
            sums[f"t2i_r{k}"] += hit_TI[:, :k].any(axis=1).mean()
    return {key: total / trials for key, total in sums.items()}


def test_one_to_one_recall_matches_torchmetrics_hit_rate():
    """With unique groups, recall@k both ways equals torchmetrics' per-query RetrievalHitRate mean."""
    g = torch.Generator().manual_seed(0)
    image_ID = torch.randn(40, 16, generator=g)
    text_TD = image_ID + 1.5 * torch.randn(40, 16, generator=g)  # noisy pairs: recall in (0, 1)
    perm_T = torch.randperm(40, generator=g)  # text j is the caption of image perm_T[j]
    text_TD, image_group_I, text_group_T = text_TD[perm_T], torch.arange(40), perm_T
    out = retrieval_recall(image_ID, text_TD, image_group_I, text_group_T, ks=(1, 5, 10))
    sim_IT = (
        torch.nn.functional.normalize(image_ID, dim=1)
        @ torch.nn.functional.normalize(text_TD, dim=1).T
    )
    relevant_IT = image_group_I[:, None] == text_group_T[None, :]
    for k in (1, 5, 10):
        assert out[f"i2t_r{k}"] == pytest.approx(_hit_rate(sim_IT, relevant_IT, k), abs=1e-6)
        assert out[f"t2i_r{k}"] == pytest.approx(_hit_rate(sim_IT.T, relevant_IT.T, k), abs=1e-6)
    assert 0.0 < out["i2t_r1"] < out["i2t_r10"] < 1.0


def test_duplicate_caption_ranked_first_is_a_hit():
    """A same-group text other than the image's "own" caption at rank 1 counts as a hit."""
    image_ID = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # texts 0, 1 share image 0's caption; 2, 3 image 1's. Image 0's nearest is text 1, image 1's
    # text 2; text 0 and text 3 are nearest to the other group's image.
    text_TD = torch.tensor([[0.5, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 0.2]])
    out = retrieval_recall(image_ID, text_TD, [0, 1], [0, 0, 1, 1], ks=(1, 2, 5))
    assert out == {"i2t_r1": 1.0, "i2t_r2": 1.0, "i2t_r5": 1.0,
                   "t2i_r1": 0.5, "t2i_r2": 1.0, "t2i_r5": 1.0}  # fmt: skip


def _random_relation(rng: np.random.Generator, num_images: int, num_texts: int) -> np.ndarray:
    """(I, T) bool: 1-3 captions per image, drawn from a pool small enough that images share some;
    a few texts match no image."""
    relevant_IT = np.zeros((num_images, num_texts), dtype=bool)
    for i in range(num_images):
        relevant_IT[i, rng.choice(num_texts - 3, size=rng.integers(1, 4), replace=False)] = True
    return relevant_IT


def test_relation_recall_matches_torchmetrics_with_several_captions_per_image():
    """Under a relation where images have several captions and captions several images (COCO-like
    and templated at once), recall@k both ways equals torchmetrics' RetrievalHitRate."""
    rng = np.random.default_rng(3)
    relevant_IT = _random_relation(rng, 30, 25)
    image_P, text_P = np.nonzero(relevant_IT)
    relevance = Relevance.from_pairs(image_P, text_P, num_images=30, num_texts=25)
    g = torch.Generator().manual_seed(3)
    image_ID = torch.randn(30, 16, generator=g)
    # each text near the mean of its images, plus noise: recall strictly between 0 and 1
    text_TD = torch.as_tensor(relevant_IT.T, dtype=torch.float32) @ image_ID + torch.randn(
        25, 16, generator=g
    )
    out = recall_at_k(image_ID, text_TD, relevance, ks=(1, 5, 10))
    sim_IT = (
        torch.nn.functional.normalize(image_ID, dim=1)
        @ torch.nn.functional.normalize(text_TD, dim=1).T
    )
    dense_IT = torch.as_tensor(relevant_IT)
    for k in (1, 5, 10):
        assert out[f"i2t_r{k}"] == pytest.approx(_hit_rate(sim_IT, dense_IT, k), abs=1e-6)
        # torchmetrics skips queries without a relevant item; ours counts them as misses
        has_match_T = dense_IT.any(dim=0)
        expected_t2i = (
            _hit_rate(sim_IT.T[has_match_T], dense_IT.T[has_match_T], k)
            * has_match_T.float().mean()
        )
        assert out[f"t2i_r{k}"] == pytest.approx(expected_t2i.item(), abs=1e-6)
    assert 0.0 < out["i2t_r1"] < 1.0


def test_groups_are_the_relation_of_equal_groups():
    """Relevance.from_groups holds exactly the pairs whose groups are equal, and matches counts."""
    image_group_I, text_group_T = [2, 0, 2, 5], [0, 2, 2, 7, 0]
    relevance = Relevance.from_groups(image_group_I, text_group_T)
    dense_IT = np.equal.outer(image_group_I, text_group_T)
    image_P, text_P = np.nonzero(dense_IT)
    assert relevance.image_text.tolist() == sorted((image_P * 5 + text_P).tolist())
    assert relevance.text_image.tolist() == sorted((text_P * 4 + image_P).tolist())
    assert relevance.matches_per_image().tolist() == dense_IT.sum(1).tolist()
    assert relevance.matches_per_text().tolist() == dense_IT.sum(0).tolist()


def test_relation_chance_matches_monte_carlo_random_rankings():
    """chance_at_k under a general relation agrees with random rankings within 0.01 (3000 trials)."""
    rng = np.random.default_rng(4)
    relevant_IT = _random_relation(rng, 20, 30)
    image_P, text_P = np.nonzero(relevant_IT)
    ks = (1, 5)
    chance = chance_at_k(Relevance.from_pairs(image_P, text_P, num_images=20, num_texts=30), ks)
    for key, value in random_ranking_recall(relevant_IT, ks, trials=3000, rng=rng).items():
        assert value == pytest.approx(chance[key], abs=0.01), key


def test_image_caption_index_groups_rows_by_image_and_caption():
    """Rows of (image id, caption) become distinct images and captions in first-seen order, each
    image's references are all of its captions, and an image matches every caption a row gives it."""
    index = ImageCaptionIndex.build(["A", "A", "B", "C", "B"], ["x", "y", "y", "z", "y"])
    assert index.image_row_I.tolist() == [0, 2, 3]
    assert index.captions_U == ["x", "y", "z"] and index.caption_row_U.tolist() == [0, 1, 3]
    assert index.row_image_R.tolist() == [0, 0, 1, 2, 1]
    assert index.row_caption_R.tolist() == [0, 1, 1, 2, 1]
    assert index.references_I() == [["x", "y"], ["y"], ["z"]]
    assert index.relevance.matches_per_image().tolist() == [2, 1, 1]
    assert index.relevance.matches_per_text().tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="image ids but"):
        ImageCaptionIndex.build(["A"], ["x", "y"])


def test_dedupe_captions_groups_identical_strings():
    """dedupe_captions keeps first-seen order and maps each caption to its unique index."""
    unique, groups = dedupe_captions(["a red cube", "a blue ball", "a red cube", "a red cube"])
    assert unique == ["a red cube", "a blue ball"]
    assert groups.tolist() == [0, 1, 0, 0]


def test_chance_exact_for_a_small_split():
    """Chance recall equals 1 - C(C-m, k)/C(C, k) averaged over queries, worked by hand."""
    # i2t: image 0 has m=2 of 4 texts, image 1 m=1. t2i: texts 0-2 have m=1 of 2 images, text 3 m=0.
    out = retrieval_chance([0, 1], [0, 0, 1, 2], ks=(1, 2))
    expected = {"i2t_r1": (2 / 4 + 1 / 4) / 2, "i2t_r2": ((1 - 1 / 6) + (1 - 3 / 6)) / 2,
                "t2i_r1": (3 * 1 / 2 + 0) / 4, "t2i_r2": (3 * 1.0 + 0) / 4}  # fmt: skip
    assert out == pytest.approx(expected, abs=1e-12)


def test_chance_matches_monte_carlo_random_rankings():
    """Chance recall agrees with recall of uniformly random rankings within 0.01 (4000 trials)."""
    rng = np.random.default_rng(0)
    image_group_I = rng.integers(0, 8, size=30)
    text_group_T = rng.integers(0, 8, size=50)
    ks = (1, 5, 10)
    chance = retrieval_chance(image_group_I, text_group_T, ks)
    relevant_IT = image_group_I[:, None] == text_group_T[None, :]
    for key, value in random_ranking_recall(relevant_IT, ks, trials=4000, rng=rng).items():
        assert value == pytest.approx(chance[key], abs=0.01), key


def test_tokenize_is_ptb_like():
    """tokenize lower-cases, splits clitics and drops punctuation like pycocoevalcap's PTB step."""
    assert tokenize("A man's dog, don't run!") == "a man 's dog do n't run"
    assert tokenize("Two dogs... play -- in (the) snow?!") == "two dogs play in the snow"


def test_bleu4_matches_hand_worked_ngram_precisions():
    """Corpus BLEU-4 equals the hand-worked value from clipped n-gram counts summed over images."""
    hyps = ["A man is riding a horse.", "Two dogs play in the snow"]
    refs = [["a man is riding a brown horse", "A person rides a horse."],
            ["two dogs are playing in the snow"]]  # fmt: skip
    # clipped matches / hypothesis n-grams, image 1 + image 2:
    # 1-grams 6/6 + 5/6 ("play" misses), 2-grams 5/5 + 3/5, 3-grams 3/4 + 1/4, 4-grams 2/3 + 0/3.
    # Lengths: hyp 6 + 6; closest refs 5 (tie 5 vs 7 goes to the shorter) + 7 -> no brevity penalty.
    expected = (11 / 12 * 8 / 10 * 4 / 8 * 2 / 6) ** (1 / 4)  # 0.59127...
    out = caption_scores(hyps, refs)
    assert out["caption_bleu4"] == pytest.approx(expected, abs=1e-6)
    assert out["caption_exact"] == 0.0


def test_identical_captions_score_perfect_bleu_positive_cider_exact_one():
    """Hypotheses equal to their references give BLEU-4 ~1, CIDEr-D > 0 and exact match 1."""
    hyps = ["a red cube on a wooden table", "Two blue balls next to a green box."]
    refs = [["a red cube on a wooden table"], ["two blue balls next to a green box"]]
    out = caption_scores(hyps, refs)
    assert out["caption_bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert out["caption_cider"] > 0.0
    assert out["caption_exact"] == 1.0


def test_cider_d_matches_closed_form():
    """CIDEr-D of a two-image corpus equals its closed form: tf-idf cosines x length penalty x 10."""
    out = caption_scores(["a b c d e", "x y z w"], [["a b c d e"], ["x y z w v"]])
    # Every n-gram has df 1 of 2 images, so all idf weights are log 2 and cancel in the cosines.
    # Image 1 is identical: cosine 1 for n = 1..4 -> 10. Image 2 (4 of 5 words, 1..4-grams all in
    # the reference): cosines 4/(2*sqrt5), 3/(sqrt3*2), 2/(sqrt2*sqrt3), 1/(1*sqrt2), times the
    # Gaussian length penalty exp(-1^2 / (2 * 6^2)).
    cosines = [2 / math.sqrt(5), math.sqrt(3) / 2, math.sqrt(2 / 3), 1 / math.sqrt(2)]
    image_2 = 10 * math.exp(-1 / 72) * sum(cosines) / 4
    assert out["caption_cider"] == pytest.approx((10 + image_2) / 2, abs=1e-9)  # 9.04845
    assert out["caption_exact"] == 0.5


def test_cider_d_ranks_perfect_above_partial_above_unrelated():
    """CIDEr-D is highest for the reference itself and ~0 for a caption sharing no word."""
    refs = [["a red cube on a wooden table"], ["two blue balls next to a green box"]]
    other = "two blue balls next to a green box"

    def cider(first: str) -> float:
        return caption_scores([first, other], refs)["caption_cider"]

    perfect, partial = cider("a red cube on a wooden table"), cider("a red cube on the floor")
    unrelated = cider("seven purple elephants dancing")
    assert perfect > partial > unrelated
    assert unrelated == pytest.approx(cider("x y z w"), abs=1e-9)  # only image 2 contributes
    unrelated_both = caption_scores(["seven purple elephants", "x y z"], refs)
    assert unrelated_both["caption_cider"] == 0.0
    assert unrelated_both["caption_bleu4"] < 1e-4


def test_single_image_cider_warns():
    """A one-image corpus warns that CIDEr-D is 0 by construction (its idf needs several images)."""
    with pytest.warns(UserWarning, match="single image"):
        out = caption_scores(["a red cube"], [["a red cube"]])
    assert out["caption_cider"] == 0.0


def test_codebook_stats_on_known_histograms():
    """Uniform codes give usage 1 and perplexity K; one code gives perplexity 1; 2:1:1 gives 2^1.5."""
    uniform = codebook_stats(torch.arange(16).repeat(3), 16)
    assert uniform == pytest.approx(
        {"codebook_usage": 1.0, "codebook_perplexity": 16.0, "dead_codes": 0}
    )
    single = codebook_stats(np.full((4, 8), 3), 16)
    assert single == pytest.approx(
        {"codebook_usage": 1 / 16, "codebook_perplexity": 1.0, "dead_codes": 15}
    )
    skewed = codebook_stats(np.array([0, 0, 1, 2]), 4)  # p = 1/2, 1/4, 1/4: H = 1.5 bits
    assert skewed == pytest.approx(
        {"codebook_usage": 0.75, "codebook_perplexity": 2**1.5, "dead_codes": 1}
    )


def test_codebook_stats_rejects_out_of_range_codes():
    """Indices outside [0, num_codes) raise ValueError instead of growing the histogram."""
    with pytest.raises(ValueError, match="codes"):
        codebook_stats(np.array([0, 16]), 16)


def test_block_scoring_equals_single_block(monkeypatch):
    """Scoring queries in blocks of 7 gives the same recall as scoring them all at once."""
    import jobs.metrics

    g = torch.Generator().manual_seed(1)
    image_ID, text_TD = torch.randn(30, 8, generator=g), torch.randn(45, 8, generator=g)
    image_group_I, text_group_T = torch.arange(30) % 9, torch.arange(45) % 9
    whole = retrieval_recall(image_ID, text_TD, image_group_I, text_group_T)
    monkeypatch.setattr(jobs.metrics, "_BLOCK", 7)
    assert retrieval_recall(image_ID, text_TD, image_group_I, text_group_T) == whole

"""Evaluation metrics: image-text retrieval, caption quality and codebook health.

Shapes: I images, T texts, D embedding width, N code indices (any shape, flattened).

- **Retrieval recall@k** (`recall_at_k`), many-to-many: a `Relevance` says which images match
  which texts. A query's hit at k is *any* matching candidate among its k most cosine-similar
  ones; recall@k is the mean hit over queries (torchmetrics' `RetrievalHitRate`, which the tests
  check against). One-to-one "text i belongs to image i" is wrong twice over: COCO has 5 captions
  per image, and templated corpora repeat a caption across images, where a one-to-one score
  counts an identical caption as a miss. `ImageCaptionIndex` turns an eval split's rows
  (image id = sha256, caption) into distinct images, distinct captions and their relation;
  `retrieval_recall` is the special case of one group id per side.
- **Chance recall@k** (`chance_at_k`): with many-to-many matches chance is not k/T, so
  every recall is logged next to the exact expectation for a random ranking of the same split:
  a query with m matches among C candidates misses with probability C(C-m, k) / C(C, k)
  (hypergeometric: none of the k drawn is a match).
- **Caption BLEU-4 and CIDEr-D** (`caption_scores`) come from pycocoevalcap's `Bleu` and
  `Cider`, the code behind the published COCO caption numbers (Papineni et al. 2002; Vedantam
  et al. 2015: tf-idf n-gram cosine with clipping, a length penalty, x10). BLEU-4 is
  corpus-level (n-gram counts summed over images, closest reference length). CIDEr-D's idf is
  computed from the references being scored, so it depends on the whole eval set and is 0 for a
  set of one image. `caption_exact` is the fraction of hypotheses whose normalised tokens equal
  those of any reference.
- **Codebook statistics** (`codebook_stats`): fraction of the K codes used, perplexity
  exp(H(p)) of the usage histogram (K when all codes are used evenly, 1 for a single code), and
  the number of dead (never used) codes.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]

# Query rows scored per block: bounds the (block, candidates) similarity matrix in memory
# (5k COCO images x 25k captions would be 500 MB at once).
_BLOCK = 1024


def dedupe_captions(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(unique captions in first-seen order, (len(captions),) int64 index into them).

    Exact string identity. Score the unique captions as retrieval candidates with
    `text_group_T = arange(len(unique))` and each image's group = its caption's index, so a
    templated corpus does not offer the same sentence as many "different" candidates.
    """
    index: dict[str, int] = {}
    groups = np.fromiter((index.setdefault(c, len(index)) for c in captions), dtype=np.int64)
    return list(index), groups


def _as_long(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.long).reshape(-1)


@dataclass(frozen=True)
class Relevance:
    """Which images match which texts: a sparse (I, T) boolean relation.

    Why a relation and not a group id per side: a group id says "image i and text t match when
    their groups are equal", which covers one caption per image (templated corpora repeat it
    across images) or several captions per image (COCO's five) but not both at once, and a
    COCO-style corpus has both (five captions per image, and "a man riding a wave on a surfboard"
    under many images). Stored as sorted codes `image * T + text` and `text * I + image`, so the
    top-k membership test of a block of queries is one `torch.isin`.
    """

    num_images: int
    num_texts: int
    image_text: torch.Tensor
    """Sorted unique int64 codes `image * num_texts + text` of the matching pairs."""
    text_image: torch.Tensor
    """The same pairs as `text * num_images + image`, sorted."""

    @classmethod
    def from_pairs(cls, image_P: ArrayLike, text_P: ArrayLike, *, num_images: int,
                   num_texts: int) -> Relevance:  # fmt: skip
        """The relation holding exactly the (image_P[p], text_P[p]) pairs (repeats allowed)."""
        img_P, txt_P = _as_long(image_P), _as_long(text_P)
        if img_P.shape != txt_P.shape:
            raise ValueError(f"{img_P.shape[0]} image ids but {txt_P.shape[0]} text ids")
        if num_images < 1 or num_texts < 1:
            raise ValueError(f"need images and texts, got {num_images} x {num_texts}")
        if len(img_P) and (img_P.min() < 0 or img_P.max() >= num_images
                           or txt_P.min() < 0 or txt_P.max() >= num_texts):  # fmt: skip
            raise ValueError(f"pair ids out of range for {num_images} images x {num_texts} texts")
        return cls(num_images, num_texts, torch.unique(img_P * num_texts + txt_P),
                   torch.unique(txt_P * num_images + img_P))  # fmt: skip

    @classmethod
    def from_groups(cls, image_group_I: ArrayLike, text_group_T: ArrayLike) -> Relevance:
        """Image i matches text t when `image_group_I[i] == text_group_T[t]`."""
        img_group, txt_group = _as_long(image_group_I), _as_long(text_group_T)
        if len(img_group) == 0 or len(txt_group) == 0:
            raise ValueError("image_group_I and text_group_T must be non-empty")
        texts_of: dict[int, torch.Tensor] = {}
        order = torch.argsort(txt_group, stable=True)
        values, counts = torch.unique_consecutive(txt_group[order], return_counts=True)
        for value, chunk in zip(values.tolist(), torch.split(order, counts.tolist()), strict=True):
            texts_of[value] = chunk
        image_P, text_P = [], []
        for i, g in enumerate(img_group.tolist()):
            texts = texts_of.get(g)
            if texts is not None:
                image_P.append(torch.full_like(texts, i))
                text_P.append(texts)
        empty = torch.zeros(0, dtype=torch.long)
        return cls.from_pairs(torch.cat(image_P) if image_P else empty,
                              torch.cat(text_P) if text_P else empty,
                              num_images=len(img_group), num_texts=len(txt_group))  # fmt: skip

    def matches_per_image(self) -> np.ndarray:
        """(I,) how many texts each image matches."""
        return np.bincount((self.image_text // self.num_texts).numpy(), minlength=self.num_images)

    def matches_per_text(self) -> np.ndarray:
        """(T,) how many images each text matches."""
        return np.bincount((self.text_image // self.num_images).numpy(), minlength=self.num_texts)


def _hits(query_QD: torch.Tensor, cand_CD: torch.Tensor, match_codes: torch.Tensor,
          ks: Sequence[int]) -> dict[int, float]:  # fmt: skip
    """recall@k for each k: mean over queries of any matching candidate in the top k, where
    query q and candidate c match when `q * C + c` is in `match_codes`."""
    num_cand = cand_CD.shape[0]
    k_max = min(max(ks), num_cand)
    hit_sums = dict.fromkeys(ks, 0.0)
    for start in range(0, query_QD.shape[0], _BLOCK):
        sim_BC = query_QD[start : start + _BLOCK] @ cand_CD.T
        top_BK = sim_BC.topk(k_max, dim=1).indices  # sorted, most similar first
        query_B = torch.arange(start, start + sim_BC.shape[0])
        match_BK = torch.isin(query_B[:, None] * num_cand + top_BK, match_codes)
        for k in ks:
            hit_sums[k] += match_BK[:, : min(k, k_max)].any(dim=1).sum().item()
    return {k: hit_sums[k] / query_QD.shape[0] for k in ks}


def _check(emb: torch.Tensor, count: int, name: str) -> None:
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(
            f"{name}: expected a non-empty 2-D embedding matrix, got {tuple(emb.shape)}"
        )
    if count != emb.shape[0]:
        raise ValueError(f"{name}: {emb.shape[0]} embeddings but {count} ids")


@torch.no_grad()
def recall_at_k(
    image_emb_ID: torch.Tensor | np.ndarray,
    text_emb_TD: torch.Tensor | np.ndarray,
    relevance: Relevance,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways under any image-text relation: {"i2t_r1", ..., "t2i_r10"} in [0, 1].

    Cosine similarity (both sides L2-normalised here, so callers may pass raw features).
    k larger than the candidate count means all candidates; a query with no matching candidate
    counts as a miss, as in `chance_at_k`.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: need positive k values, got {ks}")
    img_ID = F.normalize(torch.as_tensor(image_emb_ID).float(), dim=-1)
    txt_TD = F.normalize(torch.as_tensor(text_emb_TD).float(), dim=-1)
    _check(img_ID, relevance.num_images, "image_emb_ID")
    _check(txt_TD, relevance.num_texts, "text_emb_TD")
    if img_ID.shape[1] != txt_TD.shape[1]:
        raise ValueError(f"embedding widths differ: {img_ID.shape[1]} vs {txt_TD.shape[1]}")
    i2t = _hits(img_ID, txt_TD, relevance.image_text, ks)
    t2i = _hits(txt_TD, img_ID, relevance.text_image, ks)
    return {f"i2t_r{k}": i2t[k] for k in ks} | {f"t2i_r{k}": t2i[k] for k in ks}


def retrieval_recall(
    image_emb_ID: torch.Tensor | np.ndarray,
    text_emb_TD: torch.Tensor | np.ndarray,
    image_group_I: ArrayLike,
    text_group_T: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """`recall_at_k` where image i and text t match when their groups are equal."""
    return recall_at_k(
        image_emb_ID, text_emb_TD, Relevance.from_groups(image_group_I, text_group_T), ks
    )


def _chance(matches_Q: np.ndarray, num_cand: int, k: int) -> float:
    k = min(k, num_cand)
    total = 0.0
    for m, num_queries in Counter(matches_Q.tolist()).items():
        # C(C-m, k) / C(C, k) as a product of k ratios: exact, no huge integers.
        miss = float(np.prod([(num_cand - m - j) / (num_cand - j) for j in range(k)]))
        total += num_queries * (1.0 - max(miss, 0.0))
    return total / len(matches_Q)


def chance_at_k(relevance: Relevance, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected `recall_at_k` of a uniformly random ranking, same keys.

    The chance level for this split's relation: a recall near it means nothing was learned,
    however high it looks (a 3-template corpus gives t2i_r1 chance of 1/3).
    """
    per_image, per_text = relevance.matches_per_image(), relevance.matches_per_text()
    return {f"i2t_r{k}": _chance(per_image, relevance.num_texts, k) for k in ks} | {
        f"t2i_r{k}": _chance(per_text, relevance.num_images, k) for k in ks
    }


def retrieval_chance(
    image_group_I: ArrayLike, text_group_T: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """`chance_at_k` where image i and text t match when their groups are equal."""
    return chance_at_k(Relevance.from_groups(image_group_I, text_group_T), ks)


@dataclass(frozen=True)
class ImageCaptionIndex:
    """Rows of (image id, caption) as distinct images, distinct captions and who matches whom.

    An eval split holds one row per (image, caption) pair: one per image in CC3M-style corpora,
    five per image in COCO-style ones (one key per caption, the same image bytes, so the same
    sha256). Images are scored once each (a duplicate row would count its image several times as
    a query and offer it several times as a candidate), captions are deduplicated as candidates,
    and image i matches caption u when some row pairs them.
    """

    image_row_I: np.ndarray
    """(I,) the first row of each distinct image, in first-seen order."""
    caption_row_U: np.ndarray
    """(U,) the first row of each distinct caption, in first-seen order."""
    captions_U: list[str]
    row_image_R: np.ndarray
    """(R,) each row's image index."""
    row_caption_R: np.ndarray
    """(R,) each row's caption index."""
    relevance: Relevance

    @classmethod
    def build(cls, image_ids: Sequence[str], captions: Sequence[str]) -> ImageCaptionIndex:
        if len(image_ids) != len(captions):
            raise ValueError(f"{len(image_ids)} image ids but {len(captions)} captions")
        if not captions:
            raise ValueError("no rows to index")
        _, row_image_R = dedupe_captions([str(i) for i in image_ids])  # first-seen ids, any strings
        captions_U, row_caption_R = dedupe_captions(captions)
        num_images = int(row_image_R.max()) + 1
        return cls(image_row_I=_first_rows(row_image_R, num_images),
                   caption_row_U=_first_rows(row_caption_R, len(captions_U)), captions_U=captions_U,
                   row_image_R=row_image_R, row_caption_R=row_caption_R,
                   relevance=Relevance.from_pairs(row_image_R, row_caption_R, num_images=num_images,
                                                  num_texts=len(captions_U)))  # fmt: skip

    def references_I(self) -> list[list[str]]:
        """Each image's distinct captions (the references its generated caption is scored against)."""
        refs: list[list[str]] = [[] for _ in self.image_row_I]
        for code in self.relevance.image_text.tolist():
            image, caption = divmod(code, self.relevance.num_texts)
            refs[image].append(self.captions_U[caption])
        return refs


def _first_rows(index_R: np.ndarray, count: int) -> np.ndarray:
    """(count,) the first row at which each index 0..count-1 appears."""
    _, first = np.unique(index_R, return_index=True)
    assert len(first) == count, (len(first), count)
    return first


# PTB-like tokenizer. pycocoevalcap's PTBTokenizer shells out to Stanford CoreNLP (Java, and it
# writes a temp file into site-packages); this regex reproduces what matters for n-gram overlap:
# lower case, clitics split ("dog's" -> "dog 's", "don't" -> "do n't"), punctuation split off
# and then dropped with pycocoevalcap's own PUNCTUATIONS list (brackets: PTB's -LRB- etc.).
_TOKEN = re.compile(r"\w+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|\.\.\.|--|[^\w\s]")
_DROP = frozenset(PUNCTUATIONS) | set('()[]{}"')


def tokenize(text: str) -> str:
    """Space-joined lower-cased PTB-like tokens without punctuation (what the scorers expect)."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in _DROP)


def caption_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Corpus {"caption_bleu4", "caption_cider", "caption_exact"} of one hypothesis per image.

    `references[i]` are the (one or more) reference captions of hypothesis i. Score the whole
    eval set in one call: CIDEr-D's idf and BLEU's brevity penalty are corpus-level.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("hypotheses: empty")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("references: every hypothesis needs at least one reference")
    res = {i: [tokenize(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    if not any(r for refs in gts.values() for r in refs):
        raise ValueError("references: no words after tokenization")
    if len(hypotheses) == 1:
        warnings.warn("CIDEr-D of a single image is always 0 (idf from one image)", stacklevel=2)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # [B1, B2, B3, B4]
    cider, _ = Cider().compute_score(gts, res)
    exact = np.mean([res[i][0] in gts[i] for i in res])
    return {"caption_bleu4": float(bleu[3]), "caption_cider": float(cider),
            "caption_exact": float(exact)}  # fmt: skip


def codebook_stats(codes: torch.Tensor | np.ndarray, num_codes: int) -> dict[str, float]:
    """{"codebook_usage", "codebook_perplexity", "dead_codes"} of code indices (any shape).

    Usage alone hides collapse onto a few codes (two codes used 99:1 count as used); perplexity
    is the effective number of codes in use.
    """
    if num_codes < 1:
        raise ValueError(f"num_codes: must be >= 1, got {num_codes}")
    codes_N = (
        codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    ).reshape(-1)
    if codes_N.size == 0:
        raise ValueError("codes: empty")
    if not np.issubdtype(codes_N.dtype, np.integer):
        raise ValueError(f"codes: expected integer indices, got {codes_N.dtype}")
    if codes_N.min() < 0 or codes_N.max() >= num_codes:
        raise ValueError(
            f"codes: indices must lie in [0, {num_codes}), got {codes_N.min()}..{codes_N.max()}"
        )
    counts_K = np.bincount(codes_N, minlength=num_codes)
    p = counts_K[counts_K > 0] / codes_N.size
    return {
        "codebook_usage": float((counts_K > 0).mean()),
        "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
        "dead_codes": int((counts_K == 0).sum()),
    }

"""Evaluation metrics: image-text retrieval, caption quality and codebook health.

Shapes: I images, T texts, D embedding width, N code indices (any shape, flattened).

- **Retrieval recall@k** (`retrieval_recall`), many-to-many: image i and text t match when
  `image_group_I[i] == text_group_T[t]`. A query's hit at k is *any* matching candidate among
  its k most cosine-similar ones; recall@k is the mean hit over queries (torchmetrics'
  `RetrievalHitRate`, which the tests check against). Groups exist because one-to-one
  "text i belongs to image i" is wrong twice over: COCO has 5 captions per image (group = image
  id), and templated corpora repeat a caption across images (group = caption text, see
  `dedupe_captions`), where a one-to-one score counts an identical caption as a miss.
- **Chance recall@k** (`retrieval_chance`): with many-to-many groups chance is not k/T, so
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


def _hits(query_QD: torch.Tensor, cand_CD: torch.Tensor, query_group_Q: torch.Tensor,
          cand_group_C: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:  # fmt: skip
    """recall@k for each k: mean over queries of any same-group candidate in the top k."""
    k_max = min(max(ks), cand_CD.shape[0])
    hit_sums = dict.fromkeys(ks, 0.0)
    for start in range(0, query_QD.shape[0], _BLOCK):
        sim_BC = query_QD[start : start + _BLOCK] @ cand_CD.T
        top_BK = sim_BC.topk(k_max, dim=1).indices  # sorted, most similar first
        match_BK = cand_group_C[top_BK] == query_group_Q[start : start + _BLOCK, None]
        for k in ks:
            hit_sums[k] += match_BK[:, : min(k, k_max)].any(dim=1).sum().item()
    return {k: hit_sums[k] / query_QD.shape[0] for k in ks}


def _check(emb: torch.Tensor, group: torch.Tensor, name: str) -> None:
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(
            f"{name}: expected a non-empty 2-D embedding matrix, got {tuple(emb.shape)}"
        )
    if group.shape[0] != emb.shape[0]:
        raise ValueError(f"{name}: {emb.shape[0]} embeddings but {group.shape[0]} group ids")


@torch.no_grad()
def retrieval_recall(
    image_emb_ID: torch.Tensor | np.ndarray,
    text_emb_TD: torch.Tensor | np.ndarray,
    image_group_I: ArrayLike,
    text_group_T: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Many-to-many recall@k both ways: {"i2t_r1", ..., "t2i_r10"} in [0, 1].

    Cosine similarity (both sides L2-normalised here, so callers may pass raw features).
    k larger than the candidate count means all candidates; a query with no matching candidate
    counts as a miss, as in `retrieval_chance`.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: need positive k values, got {ks}")
    img_ID = F.normalize(torch.as_tensor(image_emb_ID).float(), dim=-1)
    txt_TD = F.normalize(torch.as_tensor(text_emb_TD).float(), dim=-1)
    img_group_I, txt_group_T = _as_long(image_group_I), _as_long(text_group_T)
    _check(img_ID, img_group_I, "image_emb_ID")
    _check(txt_TD, txt_group_T, "text_emb_TD")
    if img_ID.shape[1] != txt_TD.shape[1]:
        raise ValueError(f"embedding widths differ: {img_ID.shape[1]} vs {txt_TD.shape[1]}")
    i2t = _hits(img_ID, txt_TD, img_group_I, txt_group_T, ks)
    t2i = _hits(txt_TD, img_ID, txt_group_T, img_group_I, ks)
    return {f"i2t_r{k}": i2t[k] for k in ks} | {f"t2i_r{k}": t2i[k] for k in ks}


def _chance(query_group: np.ndarray, cand_group: np.ndarray, k: int) -> float:
    num_cand = len(cand_group)
    k = min(k, num_cand)
    cand_counts = Counter(cand_group.tolist())
    total = 0.0
    for m, num_queries in Counter(cand_counts.get(g, 0) for g in query_group.tolist()).items():
        # C(C-m, k) / C(C, k) as a product of k ratios: exact, no huge integers.
        miss = float(np.prod([(num_cand - m - j) / (num_cand - j) for j in range(k)]))
        total += num_queries * (1.0 - max(miss, 0.0))
    return total / len(query_group)


def retrieval_chance(
    image_group_I: ArrayLike, text_group_T: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Expected `retrieval_recall` of a uniformly random ranking, same keys.

    The chance level for this split's group structure: a recall near it means nothing was learned,
    however high it looks (a 3-template corpus gives t2i_r1 chance of 1/3).
    """
    img_group = _as_long(image_group_I).numpy()
    txt_group = _as_long(text_group_T).numpy()
    if len(img_group) == 0 or len(txt_group) == 0:
        raise ValueError("image_group_I and text_group_T must be non-empty")
    return {f"i2t_r{k}": _chance(img_group, txt_group, k) for k in ks} | {
        f"t2i_r{k}": _chance(txt_group, img_group, k) for k in ks
    }


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

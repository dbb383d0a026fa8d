"""The captioning task of the eval suite: a CoCa's captions of a dataset's images scored against the dataset's own
captions (BLEU-1..4, ROUGE-L, CIDEr by ``pycocoevalcap``, the scorers CLIP_benchmark's captioning task uses).

Words are lowercased and split on anything that is not a letter or digit: pycocoevalcap's PTB tokenizer (and
METEOR) run Java, SPICE also downloads Stanford CoreNLP; METEOR runs where ``java`` is on the PATH, SPICE never
(each skipped metric is named in the result with why).
"""
from __future__ import annotations

import re
import shutil
from typing import Callable, Dict, List, Tuple

import torch

from evaclip.data.transforms import Tokenizer
from evaclip.models.generate import caption_texts
from evaclip.zeroshot import EvalSet, image_batches, prefetch, total_skips


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(predictions: Dict[int, str], references: Dict[int, List[str]]) -> Tuple[Dict, Dict[str, str]]:
    """(metrics, {skipped metric: why}) of one caption per image against that image's reference captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [words(c)] for i, c in predictions.items()}
    gts = {i: [words(c) for c in references[i]] for i in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    skipped = {"spice": "needs Java and downloads Stanford CoreNLP"}
    if shutil.which("java"):
        meteor = _meteor(gts, res)
        if isinstance(meteor, float):
            metrics["meteor"] = meteor
        else:
            skipped["meteor"] = meteor
    else:
        skipped["meteor"] = "needs Java (no `java` on the PATH)"
    return metrics, skipped


def _meteor(gts, res, timeout_s: float = 300.0):
    """METEOR (a Java process pycocoevalcap talks to through pipes), or why not: a wait with a bound, the process
    killed when it passes."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as e:
        return f"Java did not start: {e}"
    out = []
    worker = threading.Thread(target=lambda: out.append(scorer.compute_score(gts, res)[0]), daemon=True)
    worker.start()
    worker.join(timeout_s)
    scorer.meteor_p.kill()
    return float(out[0]) if out else f"the Java scorer gave no score within {timeout_s:.0f} s"


def caption_function(model, device, method: str = "greedy", max_len: int = 20) -> Callable:
    """images [B, 3, H, W] -> captions, with the CoCa ``model`` (a CLIP without a decoder: a one-line error)."""
    if not hasattr(model, "caption_stepper"):
        raise ValueError("the captioning task needs a CoCa (a run with objective.kind = \"coca\"); this model has "
                         "no caption decoder")
    tok = Tokenizer(model.text.context_length)
    return lambda images: caption_texts(model, images.to(device), tok, method, max_len)


@torch.no_grad()
def evaluate_captions(caption: Callable, evalset: EvalSet, transform, batch_size: int = 64, progress=None,
                      workers: int = 0, shard: Tuple[int, int] = (0, 1),
                      gather: Callable = lambda x: [x]) -> Tuple[Dict[str, float], Dict]:
    """(metrics, {skipped_metrics, examples}): captions of the dataset's images (sharded over ranks like the other
    tasks, every rank gets the same metrics) scored against its captions."""
    preds, refs = {}, {}
    for images, caps in prefetch(image_batches(evalset.samples(shard), transform, batch_size, workers)):
        for (i, cs), text in zip(caps, caption(images)):
            preds[i], refs[i] = text, list(cs)
        if progress:
            progress(len(caps))
    parts = gather((preds, refs, dict(evalset.skipped)))
    total_skips(evalset, parts)
    preds = {i: t for p in parts for i, t in p[0].items()}
    refs = {i: r for p in parts for i, r in p[1].items()}
    if not preds:
        raise ValueError("no readable image in the dataset")
    metrics, skipped = caption_scores(preds, refs)
    return metrics, {"skipped_metrics": skipped,
                     "examples": [{"caption": preds[i], "references": refs[i]} for i in sorted(preds)[:3]]}

"""The losses that build the b x G logits: the naive reference, local (open_clip's), SigLIP's."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F



def clip_loss_naive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, rows: Optional[list] = None) -> torch.Tensor:
    """Reference CLIP loss on already-gathered features [G, D] (every rank computes the same value).

    ``rows``: a list that receives each sample's loss [G] (detached), here and in every loss below (the
    samples are a rank's own rows there); their mean is the loss."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    if rows is not None:
        with torch.no_grad():
            diag = logits.diagonal()
            rows.append((torch.logsumexp(logits, 1) + torch.logsumexp(logits, 0) - 2 * diag) / 2)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def clip_loss_local(img_loc, txt_loc, img_all, txt_all, scale, offset: int, rows: Optional[list] = None) -> torch.Tensor:
    """This rank's rows [b, G] of both logit matrices; labels are the rank's offset diagonal."""
    labels = torch.arange(img_loc.shape[0], device=img_loc.device) + offset
    if rows is None:
        return (F.cross_entropy(scale * img_loc @ txt_all.t(), labels)
                + F.cross_entropy(scale * txt_loc @ img_all.t(), labels)) / 2
    per = (F.cross_entropy(scale * img_loc @ txt_all.t(), labels, reduction="none")
           + F.cross_entropy(scale * txt_loc @ img_all.t(), labels, reduction="none")) / 2
    rows.append(per.detach())
    return per.mean()


# ---------------------------------------------------------------------------------------------- tile kernels
# Rows a [n, D] against columns b [m, D], in tiles of ``tile`` x ``tile``; tensors already in the compute dtype.
# Positive pairs are handled by the callers (they are local rows), so the kernels see every pair alike.


def siglip_loss(img_loc, txt_all, scale, bias, offset: int, rows: Optional[list] = None) -> torch.Tensor:
    """Sigmoid loss of this rank's rows [b, G]; normalised by the local batch size as in the SigLIP paper."""
    logits = scale * img_loc @ txt_all.t() + bias
    z = -torch.ones_like(logits)
    idx = torch.arange(img_loc.shape[0], device=logits.device)
    z[idx, idx + offset] = 1.0
    per = -F.logsigmoid(z * logits).sum(1)
    if rows is not None:
        rows.append(per.detach())
    return per.sum() / img_loc.shape[0]


def soft_ce_local(img_loc, txt_loc, img_all, txt_all, t_img_loc, t_txt_loc, t_img_all, t_txt_all, scale, t_scale,
                  rows: Optional[list] = None) -> torch.Tensor:
    """Distillation (open_clip's ``DistillClipLoss``): the cross-entropy of the student's similarity distribution
    of each of this rank's rows [b, G] to the teacher's, image -> text and text -> image, averaged."""
    def soft_ce(a, b, c, d):
        target = (t_scale * c @ d.t()).softmax(dim=1)
        return -(target * (scale * a @ b.t()).log_softmax(dim=1)).sum(1)

    per = (soft_ce(img_loc, txt_all, t_img_loc, t_txt_all) + soft_ce(txt_loc, img_all, t_txt_loc, t_img_all)) / 2
    if rows is not None:
        rows.append(per.detach())
    return per.mean()

"""Loading torch files without running code from them.

``torch.load`` unpickles: a crafted ``.pt``/``.bin`` can run any command when it is loaded. Every torch file
evaclip reads (inits, its own checkpoints, DeepSpeed's shards) is loaded with ``weights_only=True``, which
accepts tensors and plain containers only. A file that needs more is refused with one line naming it; the
explicit opt-in (``model.trust_pickle`` / ``checkpoint.trust_pickle`` / ``--trust-pickle``) loads it anyway.

DeepSpeed loads its own files with ``weights_only=False``; ``deepspeed_loads()`` forces weights-only loading
around those calls (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read by torch at every call) and allows the few
DeepSpeed and Python types its checkpoints contain.
"""
from __future__ import annotations

import contextlib
import os
import re
import zipfile
from typing import Any

from evaclip.errors import UnsafeFileError

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(path: str, what: str, err: Exception, opt_in: str) -> UnsafeFileError:
    m = _GLOBAL_RE.search(str(err))
    obj = f" (it would import {m.group(1)})" if m else ""
    return UnsafeFileError(f"{what}: {path} holds more than tensors{obj}; refusing to unpickle it (it could run "
                           f"code). Convert it to .safetensors, or if you trust its source set {opt_in}")


def is_torchscript(path: str) -> bool:
    """OpenAI's original CLIP weights are TorchScript archives (a zip holding ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def load_torch(path: str, what: str, trust_pickle: bool = False, opt_in: str = "model.trust_pickle=true",
               map_location: Any = "cpu") -> Any:
    """``torch.load`` that refuses pickled objects unless ``trust_pickle``; TorchScript archives are read with
    ``torch.jit.load`` on CPU (as open_clip reads OpenAI's weights) and returned as their state dict."""
    import pickle

    import torch

    if is_torchscript(path):
        return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise _refusal(path, what, e, opt_in) from None
    except (RuntimeError, EOFError) as e:
        from evaclip.errors import CheckpointError

        raise CheckpointError(f"{what}: {path} is not a readable torch file ({str(e).splitlines()[0][:200]})") from None


def _deepspeed_globals():
    """Types DeepSpeed stores in its checkpoints besides tensors (checked against 0.19)."""
    import collections

    out = [collections.OrderedDict, collections.defaultdict, set, frozenset]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:
        pass
    return out


@contextlib.contextmanager
def deepspeed_loads(path: str, what: str = "checkpoint", trust_pickle: bool = False):
    """Make DeepSpeed's own ``torch.load`` calls weights-only inside this block (unless ``trust_pickle``)."""
    import pickle

    import torch

    if trust_pickle:
        yield
        return
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise _refusal(path, what, e, "checkpoint.trust_pickle=true (or --trust-pickle)") from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old

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

import ast
import collections
import contextlib
import io
import os
import re
import warnings
import zipfile
from typing import Any, Dict

from evaclip.errors import CheckpointError, UnsafeFileError

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


class _ScriptObject:
    """Stands for a TorchScript class of the archive: keeps the state the pickle gives it, runs none of its code."""

    def __setstate__(self, state):
        self.state = state


def _script_tensor_names(z: zipfile.ZipFile, root: str) -> Dict[str, set]:
    """Per TorchScript class ('module.Name'), its parameters and buffers, as its ``code/`` declares them
    (``__parameters__ = [...]``, ``__buffers__ = [...]``): parsed as text, never run."""
    out: Dict[str, set] = {}
    for name in z.namelist():
        if not (name.startswith(f"{root}/code/") and name.endswith(".py")):
            continue
        module = name[len(root) + 6:-3].replace("/", ".")
        for node in ast.parse(z.read(name).decode("utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names = set()
                for a in node.body:
                    if isinstance(a, ast.Assign) and any(getattr(t, "id", "") in ("__parameters__", "__buffers__")
                                                         for t in a.targets) and isinstance(a.value, ast.List):
                        names |= {e.value for e in a.value.elts if isinstance(e, ast.Constant)}
                out[f"{module}.{node.name}"] = names
    return out


def read_torchscript_weights(path: str, what: str) -> Dict[str, Any]:
    """A TorchScript archive's parameters and buffers (what ``torch.jit.load(path).state_dict()`` gives),
    read from the zip without running anything from it: ``torch.jit.load`` runs the archive's own TorchScript
    (``__setstate__``), so a weights file could act on load. OpenAI's original CLIP files are such archives."""
    import pickle

    import torch

    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
        declared = _script_tensor_names(z, root)
        allowed = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                   ("collections", "OrderedDict"): collections.OrderedDict}

        class Reader(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "__torch__" or module.startswith("__torch__."):
                    return type(name, (_ScriptObject,), {"qualname": f"{module}.{name}"})
                if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
                    with warnings.catch_warnings():  # the legacy storage classes warn on use; only the dtype is read
                        warnings.simplefilter("ignore")
                        return getattr(torch, name).dtype
                if (module, name) in allowed:
                    return allowed[(module, name)]
                raise UnsafeFileError(f"{what}: {path} is a TorchScript archive that needs {module}.{name} to "
                                      "load; refusing to run it (convert it to .safetensors where you trust it)")

            def persistent_load(self, pid):  # ('storage', storage type, key, location, numel)
                _, dtype, key, _, _ = pid
                raw = torch.UntypedStorage.from_buffer(z.read(f"{root}/data/{key}"), dtype=torch.uint8)
                return torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)

        obj = Reader(io.BytesIO(z.read(f"{root}/data.pkl"))).load()
    out: Dict[str, Any] = {}

    def walk(o, prefix):
        state = getattr(o, "state", None)
        if not isinstance(state, dict):  # a class with its own __getstate__: only its code knows its weights
            raise UnsafeFileError(f"{what}: {path}: TorchScript class {o.qualname} stores its state through its own "
                                  "code; refusing to run it (convert it to .safetensors where you trust it)")
        for k, v in state.items():
            if isinstance(v, _ScriptObject):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor) and k in declared.get(o.qualname, ()):
                out[prefix + k] = v

    walk(obj, "")
    return out


def load_torch(path: str, what: str, trust_pickle: bool = False, opt_in: str = "model.trust_pickle=true",
               map_location: Any = "cpu") -> Any:
    """``torch.load`` that refuses pickled objects unless ``trust_pickle``; a TorchScript archive (OpenAI's
    CLIP files) gives its weights as a state dict, read without running its code (``read_torchscript_weights``)."""
    import pickle

    import torch

    if is_torchscript(path):
        try:
            return read_torchscript_weights(path, what)
        except UnsafeFileError as e:
            if not trust_pickle:
                raise UnsafeFileError(f"{e}; or if you trust its source set {opt_in}") from None
            return torch.jit.load(path, map_location="cpu").state_dict()  # the opt-in: its code runs
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise _refusal(path, what, e, opt_in) from None
    except (RuntimeError, EOFError) as e:
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
def deepspeed_loads(path: str, what: str = "checkpoint", trust_pickle: bool = False,
                    opt_in: str = "checkpoint.trust_pickle=true (or --trust-pickle)"):
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
        raise _refusal(path, what, e, opt_in) from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old

"""Read EDM-style network pickles (EDM, Patch Diffusion) without running any code stored in them.

An EDM `network-snapshot-*.pkl` is a plain pickle of `dict(ema=…, loss_fn=…, augment_pipe=…,
dataset_kwargs=…)`. Its networks are "persistent" classes: each object is pickled as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the Python source
of the class's module, which `pickle.load` would execute. Plain torch containers (`ModuleDict`)
are pickled by class name and would be imported.

`RestrictedUnpickler` imports and runs only torch's tensor-rebuilding functions and plain
containers. Every object of the official code (`training.*`, `torch_utils.*`, `dnnlib.*`,
`torch.nn.modules.*`, and numpy scalars held as module attributes) becomes an inert
`PickledObject` that records its class name and the state pickle hands it; the source in a
persistent object's `meta` is dropped unread. Any other global (`posix.system`, `builtins.eval`,
`subprocess.*`, …) is refused with a `UserError`. `module_state_dict` then flattens a recorded
module tree into the name → tensor dict that `state_dict()` would have given.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch

from diffrepro.errors import UserError


def _storage_from_bytes(data: bytes):
    """Replaces `torch.storage._load_from_bytes`, which would read the bytes with a full unpickler."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# The only callables a pickle may name: they rebuild tensors and containers, nothing else.
REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
# Modules whose objects are recorded, never imported: the official code and what its modules hold.
RECORDED_MODULES = ("training", "torch_utils", "dnnlib", "torch.nn.modules", "numpy")
PERSISTENT_RECONSTRUCTOR = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class PickledObject:
    """An object of the pickle, recorded instead of rebuilt: `type_name` (its class), `args` (what
    it was created with), `state` (what pickle's BUILD gave it) and `items` (what SETITEMS gave it)."""

    type_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:
        self.items[key] = value

    def __repr__(self) -> str:
        return f"<pickled {self.type_name}>"


_recorded_types: dict[str, type] = {}


def recorded_type(type_name: str) -> type:
    """One `PickledObject` subclass per class name, so NEWOBJ gets a class and the name is kept."""
    if type_name not in _recorded_types:
        _recorded_types[type_name] = type("PickledObject", (PickledObject,), {"type_name": type_name})
    return _recorded_types[type_name]


def _persistent_object(meta) -> PickledObject:
    """Stands in for `_reconstruct_persistent_obj(meta)`: keeps the class name and state, drops the
    module source without executing it."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a persistent object without a class name")
    obj = recorded_type(meta["class_name"])()
    obj.state = meta.get("state")
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves globals from the allow-lists above and refuses the rest."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in REBUILDERS:
            return REBUILDERS[(module, name)]
        if (module, name) == PERSISTENT_RECONSTRUCTOR:
            return _persistent_object
        if any(module == m or module.startswith(m + ".") for m in RECORDED_MODULES):
            return recorded_type(f"{module}.{name}")
        raise UserError(f"{self.source}: refused to unpickle the global {module}.{name}; official network "
                        f"pickles hold only tensors, containers and module records, so this file is not one")


def load_pickle(path: str | Path):
    """Unpickle `path` with `RestrictedUnpickler`; a malformed file is a one-line UserError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except UserError:
        raise
    except Exception as err:  # truncated file, not a pickle, a storage torch cannot read
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a readable network pickle ({type(err).__name__}: {first})") from err


def module_state_dict(module: PickledObject, source: str) -> dict[str, torch.Tensor]:
    """name → tensor of a recorded torch module tree, in `state_dict()` order: each module's
    `_parameters`, then its persistent `_buffers`, then its `_modules`, recursively."""
    flat: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        state = node.state if isinstance(node, PickledObject) else None
        if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
            raise UserError(f"{source}: {prefix.rstrip('.') or 'the network'} ({node!r}) is not a pickled torch module")
        transient = state.get("_non_persistent_buffers_set") or set()
        tensors = [*state.get("_parameters", {}).items(),
                   *((k, v) for k, v in state.get("_buffers", {}).items() if k not in transient)]
        for name, tensor in tensors:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{source}: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            flat[prefix + name] = tensor.detach()
        for name, child in state["_modules"].items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return flat

"""torch's optimizer state-dict layout for the SAM family, with each method's own state.

A SAM-family optimizer shares ``state`` and ``param_groups`` with the base optimizer it
wraps, so ``torch.optim.Optimizer.state_dict()`` on it is the base optimizer's state dict,
``{"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}``, whose groups also
hold ρ, the adaptive form and η (and GSAM's schedule). A method's own persistent values
enter that shape when the state dict is made and leave it when one is loaded; they are
never kept in the live ``optimizer.state``, where a base optimizer would take them for its
own (Adam initialises a parameter's state only while it is empty):

* per-parameter tensors (LookSAM's ``g_v``) go into ``state[i]`` under the method's keys;
* optimizer-wide values (step counters, ESAM's seed, ``‖g_v‖``) go into every param group,
  as timm's ``Lookahead`` keeps its counters.

So torch's state-dict hooks, ``torch.save`` and tools that read optimizer state see the
usual layout. :class:`MethodStateDict` gives the SAM engine ``state_dict`` and
``load_state_dict`` and registers the hooks that do this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    from flatmin.optim.sam import SAM

SETTING_KEYS = ("rho", "adaptive", "eta")


class MethodStateDict:
    """``state_dict``/``load_state_dict`` of the SAM family (mixed into ``SAM`` before
    ``torch.optim.Optimizer``). A method declares the keys of its own state in
    :attr:`_state_keys` (per-parameter tensors) and :attr:`_group_keys` (optimizer-wide
    values) and provides them through the three methods below."""

    _state_keys: tuple[str, ...] = ()
    _group_keys: tuple[str, ...] = ()

    def _register_state_dict_hooks(self: Any) -> None:
        """Called once by the constructor; the hooks run before any added by users."""
        self.register_state_dict_post_hook(add_method_state, prepend=True)
        self.register_load_state_dict_post_hook(take_method_state, prepend=True)

    def state_dict(self: Any) -> dict[str, Any]:
        """torch's ``{"state": …, "param_groups": …}``: the base optimizer's state, the
        SAM settings in the groups and the method's own state. The copy of ``w`` is never
        saved; call it between two steps."""
        if self.is_perturbed:
            raise RuntimeError(
                "state_dict() between first_step() and second_step() would pair perturbed "
                "weights with the optimizer state; call it after second_step()"
            )
        return Optimizer.state_dict(self)

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`; it is checked before anything changes."""
        check_loadable(self, state_dict)
        Optimizer.load_state_dict(self, state_dict)

    def _state_extras(self) -> dict[Tensor, dict[str, Tensor]]:
        """The method's per-parameter tensors, keyed by :attr:`_state_keys`."""
        return {}

    def _group_extras(self) -> dict[str, Any]:
        """The method's optimizer-wide values, keyed by :attr:`_group_keys`."""
        return {}

    def _load_method_state(
        self, per_param: dict[Tensor, dict[str, Tensor]], values: dict[str, Any]
    ) -> None:
        """Take back the values of :meth:`_state_extras` and :meth:`_group_extras`."""
        del per_param, values


def add_method_state(optimizer: SAM, state_dict: dict[str, Any]) -> None:
    """State-dict post-hook: add the method's values to torch's packed layout.

    The packed ``state[i]`` dicts are the live ones, so they are replaced, not updated.
    """
    index = {id(p): i for i, p in enumerate(optimizer._params())}
    packed = state_dict["state"]
    for param, extras in optimizer._state_extras().items():
        i = index[id(param)]
        packed[i] = {**packed.get(i, {}), **extras}
    values = optimizer._group_extras()
    for group in state_dict["param_groups"]:
        group.update(values)


def take_method_state(optimizer: SAM) -> None:
    """Load-state-dict post-hook: move the method's values out of the state torch just
    loaded, share the loaded state with the base optimizer again and hand the values to
    the method."""
    state_keys, group_keys = optimizer._state_keys, optimizer._group_keys
    per_param: dict[Tensor, dict[str, Tensor]] = {}
    for param in list(optimizer.state):
        live = optimizer.state[param]
        extras = {key: live.pop(key) for key in state_keys if key in live}
        if extras:
            per_param[param] = extras
        if not live:
            del optimizer.state[param]
    values = {key: optimizer.param_groups[0][key] for key in group_keys}
    for group in optimizer.param_groups:
        for key in group_keys:
            del group[key]
    # The base optimizer's own __setstate__ fills in settings an older torch did not save.
    optimizer.base_optimizer.__setstate__(
        {"state": optimizer.state, "param_groups": optimizer.param_groups}
    )
    optimizer._load_method_state(per_param, values)
    optimizer._clear_transient()


def check_loadable(optimizer: SAM, state_dict: Any) -> None:
    """Raise a ValueError, before anything is loaded, unless ``state_dict`` is a state dict
    of this kind of optimizer over the same parameters, with usable settings."""
    name = type(optimizer).__name__
    if isinstance(state_dict, Mapping) and {"base_optimizer", "method"} <= set(state_dict):
        raise ValueError(
            f"this optimizer state has the layout {{'base_optimizer', 'method'}}, which "
            f"{name}.load_state_dict() no longer reads: {name}.state_dict() now has "
            "torch's {'state', 'param_groups'} layout; resume from a checkpoint written "
            "with it (or start the run again)"
        )
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"expected a state dict produced by {name}.state_dict(), with keys 'state' and "
            "'param_groups'"
        )
    saved = [len(g["params"]) for g in state_dict["param_groups"]]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if saved != ours:
        raise ValueError(
            f"the state dict holds param groups of {saved} parameters, this optimizer has "
            f"{ours}: load a state dict of the same model and param groups"
        )
    for group in state_dict["param_groups"]:
        missing = [k for k in (*SETTING_KEYS, *optimizer._group_keys) if k not in group]
        if missing:
            raise ValueError(
                f"expected a state dict produced by {name}.state_dict(); its param groups "
                f"lack {missing} (a state dict of another optimizer?)"
            )
        optimizer._check_group(group)
    params = optimizer._params()
    # State keys are the ids in the groups' "params": integers from state_dict(), the
    # parameters' names from torch.distributed.checkpoint's set_optimizer_state_dict.
    saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
    position = {key: i for i, key in enumerate(saved_ids) if i < len(params)}
    for key_of_param, entry in state_dict["state"].items():
        i = position.get(key_of_param)
        if i is None or not isinstance(entry, Mapping):
            continue  # torch's own loading decides about entries that are not ours
        for key in optimizer._state_keys:
            value = entry.get(key)
            if value is not None and tuple(value.shape) != tuple(params[i].shape):
                raise ValueError(
                    f"the state dict's {key!r} of parameter {i} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(params[i].shape)}: load a "
                    "state dict of the same model and param groups"
                )

"""The engine's optimiser: SGD with (Nesterov) momentum and per-group weight decay.

The same arithmetic as ``torch.optim.SGD`` (dampening 0): ``g += wd * p``; ``b = g`` on the first
step, then ``b = momentum * b + g``; Nesterov ``g += momentum * b`` (else ``g = b``); ``p -= lr * g``.
It is here rather than taken from ``torch.optim`` because every ``torch.optim`` optimiser imports
``torch._dynamo`` the first time one of its methods runs (their ``torch._disable_dynamo``
wrappers): 0.8 s of each training stage's start on two CPU cores, for a compiler the engine does
not use on the optimiser. The element-wise operations are torch's own (``torch._foreach_*``,
which on a CPU applies the per-tensor ops ``torch.optim.SGD`` uses there), so training gives the
same weights bit for bit; ``state_dict`` has ``torch.optim.SGD``'s layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class SGD:
    """``param_groups``: dicts with ``params`` and ``weight_decay`` (plus ``lr``, ``momentum``,
    ``nesterov``, defaulting to the constructor's); the engine sets each group's ``lr`` per step."""

    def __init__(self, param_groups: list[dict], *, lr: float, momentum: float = 0.0, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        self.param_groups = [{"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, **group,
                              "params": list(group["params"])} for group in param_groups]
        self._buffers: list[list[Tensor | None]] = [[None] * len(g["params"]) for g in self.param_groups]

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, the only way the engine clears them)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group, buffers in zip(self.param_groups, self._buffers):
            live = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if not live:
                continue
            params = [group["params"][i] for i in live]
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum:
                if all(buffers[i] is not None for i in live):
                    bufs = [buffers[i] for i in live]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                else:  # first step: the buffer starts as the gradient
                    bufs = []
                    for i, g in zip(live, grads):
                        if buffers[i] is None:
                            buffers[i] = g.detach().clone()
                        else:
                            buffers[i].mul_(momentum).add_(g)
                        bufs.append(buffers[i])
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])

    def state_dict(self) -> dict[str, Any]:
        state, groups, index = {}, [], 0
        for group, buffers in zip(self.param_groups, self._buffers):
            ids = list(range(index, index + len(group["params"])))
            state.update({i: {"momentum_buffer": b} for i, b in zip(ids, buffers) if b is not None})
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "dampening": 0.0, "params": ids})
            index += len(ids)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or ``torch.optim.SGD``'s, same layout); raises
        ``ValueError`` when it does not fit these parameters, leaving this optimiser as it was."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(len(s["params"]) != len(g["params"])
                                                       for s, g in zip(saved, self.param_groups)):
            raise ValueError("optimizer state has a different number of parameter groups or parameters")
        buffers = []
        for s, group in zip(saved, self.param_groups):
            if s.get("dampening", 0.0) != 0.0:
                raise ValueError("optimizer state uses dampening, which this SGD does not")
            row = []
            for i, p in zip(s["params"], group["params"]):
                b = state_dict["state"].get(i, {}).get("momentum_buffer")
                if b is not None and b.shape != p.shape:
                    raise ValueError(f"momentum buffer of shape {tuple(b.shape)} for a parameter of shape {tuple(p.shape)}")
                row.append(None if b is None else b.to(device=p.device, dtype=p.dtype).clone())
            buffers.append(row)
        self._buffers = buffers
        for s, group in zip(saved, self.param_groups):
            group.update({k: s[k] for k in ("lr", "momentum", "nesterov", "weight_decay") if k in s})

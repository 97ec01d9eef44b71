"""What a run's update does to its networks, measured apart from the update (``model.probe``, ``probe/*`` logs).

The objective sums C51 and the InfoNCE terms before one backward, so the logged losses cannot say which term moves
the shared encoder, or whether the terms pull it in opposite directions. On logging steps, with ``model.probe``, the
module runs `probe` on the step's last minibatch: a second forward of `core_losses` on the weights after the step's
updates, and one gradient per loss term taken with ``torch.autograd.grad``. Nothing is written to ``.grad``, to the
optimiser, to any random generator or to the networks: the run trains bitwise as without the probe
(``tests/test_probe.py``) and costs one forward and one backward per term per logging step.

Logged (scalars, means over the ranks under DDP):

* ``probe/grad_encoder_<term>``: the norm of the gradient of ``lambda * term`` (C51: weight 1) over the encoder's
  parameters, the part every term shares; ``probe/grad_cos_c51_<term>``: the cosine of that gradient with C51's
  (negative: the InfoNCE term pulls the encoder against C51). ``probe/grad_head_c51``: C51's gradient over the
  Q-head, ``probe/grad_critic_<term>``: the term's over its critic heads.
* ``probe/q_mean``, ``probe/action_gap``: the mean Q-value and the mean gap between the best and second-best
  action's Q-value on the minibatch's states.
* ``probe/greedy_entropy`` (nats) and ``probe/greedy_top_frac``: the entropy of the greedy actions' histogram over
  the minibatch's states and the share of its most frequent action (a policy collapsed onto one action: 0 and 1),
  and ``probe/greedy_frac_<a>`` for each action ``a``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from driml_pl.critic import TERMS
from driml_pl.learner.objective import UpdateInputs, core_losses, q_values
from driml_pl.networks import preprocess


def _flat(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
    """One vector of ``grads`` (a parameter a term does not reach contributes zeros)."""
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat).float()


def _grad(value: Tensor, params: list[nn.Parameter]) -> Tensor:
    return _flat(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params)


def probe(module: Any, inputs: UpdateInputs) -> dict[str, Tensor]:
    """The ``probe/*`` scalars (above) of ``module`` on ``inputs``, as 0-dim float tensors on the module's device."""
    x = inputs
    has_future = (x.k > 0).float()
    encoder = [p for p in module.online.encoder.parameters() if p.requires_grad]
    head = [p for p in module.online.head.parameters() if p.requires_grad]
    out = core_losses(module, x.obs, x.action, x.returns, x.discount, x.next_obs, x.positive_obs, has_future)
    values: dict[str, Tensor] = {}
    c51 = _grad(out["c51_loss"], encoder + head)
    n_enc = sum(p.numel() for p in encoder)
    c51_encoder = c51[:n_enc]
    values["probe/grad_encoder_c51"] = c51_encoder.norm()
    values["probe/grad_head_c51"] = c51[n_enc:].norm()
    for term in module.critic.terms:
        critic = [p for n, p in module.critic.named_parameters() if p.requires_grad and _serves(n, term)]
        g = _grad(module.lambdas[term] * out[f"nce_{term}"], encoder + critic)
        g_encoder = g[:n_enc]
        values[f"probe/grad_encoder_{term}"] = g_encoder.norm()
        values[f"probe/grad_critic_{term}"] = g[n_enc:].norm()
        cos = torch.dot(c51_encoder, g_encoder) / (c51_encoder.norm() * g_encoder.norm()).clamp_min(1e-30)
        values[f"probe/grad_cos_c51_{term}"] = cos
    with torch.no_grad():
        _, logits = module.online(preprocess(x.obs, module.obs_size))
        q = q_values(logits, module.support)
        top2 = q.topk(2, dim=-1).values
        values["probe/q_mean"] = q.mean()
        values["probe/action_gap"] = (top2[:, 0] - top2[:, 1]).mean()
        greedy = q.argmax(-1)
        n = q.shape[-1]
        frac = (greedy[:, None] == torch.arange(n, device=q.device)).float().mean(0)
        values["probe/greedy_entropy"] = -(frac * frac.clamp_min(1e-30).log()).sum()
        values["probe/greedy_top_frac"] = frac.max()
        for a in range(n):
            values[f"probe/greedy_frac_{a}"] = frac[a]
    return {k: v.detach().float() for k, v in values.items()}


def _serves(name: str, term: str) -> bool:
    """Whether the critic's parameter ``name`` belongs to ``term``'s heads (the action embedding serves every term).

    The critic keys its heads by term (``anchor_heads.<term>...``, ``positive_heads.<term>...``); a parameter with no
    term in its name is shared by all of them."""
    named = [p for p in name.split(".") if p in TERMS]
    return not named or term in named

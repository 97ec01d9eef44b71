"""Pinned values of the DIM critic and of the C51 loss, so that a refactor which changes the math fails loudly.

Every weight and input is a fixed number from ``lcg_values`` (a 32-bit linear congruential generator, so no library's
random stream is involved). The literals were computed once, in float64, by the plain-loop references below
(``reference_infonce``, ``reference_projection``, ``reference_cross_entropy``): Python loops over batch elements,
positions, units and atoms that use neither torch nor the project's functions. Each test asserts both that the
project gives the literals (float32, to ~1e-5) and that the reference still does (float64, to ~1e-9). If a
deliberate change of the math moves the numbers, recompute them with the references and say why in the commit.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from driml_pl.critic import DIMCritic
from driml_pl.losses import c51_cross_entropy, categorical_projection
from driml_pl.networks import Features

B, C, H, W, D = 3, 3, 2, 2, 5  # batch, local channels, local grid, global width
NUM_ACTIONS, ACTION_DIM, RKHS, CLIP = 4, 3, 4, 3.0  # raw scores reach 2-20: the soft clip is far from linear
ACTIONS = [2, 0, 3]
TERMS = ("ll", "lg", "gl", "gg")
PROJECT = {"rtol": 1e-5, "atol": 1e-6}  # float32 against float64 literals
REFERENCE = {"rel": 1e-9, "abs": 1e-12}


def lcg_values(n: int, seed: int) -> np.ndarray:
    """``n`` numbers in [-1, 1) from x <- (1664525 x + 1013904223) mod 2**32 (Numerical Recipes), from ``seed``."""
    x, out = seed % 2**32, []
    for _ in range(n):
        x = (1664525 * x + 1013904223) % 2**32
        out.append(x / 2**31 - 1.0)
    return np.array(out, dtype=np.float64)


def fixed_array(shape: tuple[int, ...], name: str, scale: float = 1.0) -> np.ndarray:
    """A fixed array per name: the same numbers whatever else exists or in what order it is built."""
    return scale * lcg_values(math.prod(shape), zlib.crc32(name.encode())).reshape(shape)


def fixed_parameters(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Overwrite every parameter of ``module`` with fixed numbers (weights ~ 2/sqrt(fan_in), biases 0.2).

    Returns the numbers per parameter name, in float64.
    """
    params = {}
    for name, p in module.named_parameters():
        scale = 2.0 / math.sqrt(math.prod(p.shape[1:])) if p.dim() > 1 else 0.2
        params[name] = fixed_array(tuple(p.shape), name, scale)
        with torch.no_grad():
            p.copy_(torch.from_numpy(params[name]))
    return params


def fixed_inputs() -> dict[str, np.ndarray]:
    return {
        "anchor_local": np.abs(fixed_array((B, C, H, W), "anchor_local", 2.0)),  # local features are post-ReLU
        "anchor_global": fixed_array((B, D), "anchor_global", 2.0),
        "candidate_local": np.abs(fixed_array((B, C, H, W), "candidate_local", 2.0)),
        "candidate_global": fixed_array((B, D), "candidate_global", 2.0),
    }


# ----------------------------------------------------------------------------------------------- plain-loop references


def reference_residual_mlp(params: dict[str, np.ndarray], prefix: str, x: list[float]) -> list[float]:
    """``skip(x) + l2(relu(l1(x)))`` on one vector; 1x1 conv weights (out, in, 1, 1) act as (out, in) matrices."""

    def affine(layer: str, v: list[float]) -> list[float]:
        w = params[f"{prefix}.{layer}.weight"]
        w = w.reshape(w.shape[0], -1)
        bias = params.get(f"{prefix}.{layer}.bias")
        out = []
        for o in range(w.shape[0]):
            total = float(bias[o]) if bias is not None else 0.0
            for i in range(len(v)):
                total += float(w[o, i]) * v[i]
            out.append(total)
        return out

    hidden = [max(0.0, h) for h in affine("l1", x)]
    return [s + y for s, y in zip(affine("skip", x), affine("l2", hidden), strict=True)]


def reference_infonce(
    params: dict[str, np.ndarray], inputs: dict[str, np.ndarray], actions: list[int], action_conditioned: bool
) -> dict[str, float]:
    """The four DIM InfoNCE losses (spec §2.3-2.4, §2.8), one anchor, position and candidate at a time.

    Action-conditioned: anchor head ``anchor_heads.<t>`` on [features(s_t), emb(a_t)], candidate head
    ``candidate_heads.<t>`` on features(s_{t+k}), emb = the action encoder on one-hot(a_t). DRIML-noact: no action;
    LL and GG one head ``noact_heads.<t>`` on both sides, LG and GL ``noact_heads.<t>_local`` / ``_global``.
    Score = clip * tanh(u.v / sqrt(rkhs) / clip); loss = mean over positions and anchors of -log softmax_j at j = i.
    """
    kind_names = {"l": "local", "g": "global"}

    def features(side: str, kind: str, i: int, pos: tuple[int, int] | None) -> list[float]:
        if kind == "g":
            return [float(v) for v in inputs[f"{side}_global"][i]]
        assert pos is not None
        return [float(inputs[f"{side}_local"][i, c, pos[0], pos[1]]) for c in range(C)]

    emb: list[list[float]] = [[] for _ in range(B)]
    if action_conditioned:
        emb = [
            reference_residual_mlp(
                params, "action_encoder.net", [1.0 if a == actions[i] else 0.0 for a in range(NUM_ACTIONS)]
            )
            for i in range(B)
        ]

    losses = {}
    for term in TERMS:
        if action_conditioned:
            anchor_head, candidate_head = f"anchor_heads.{term}", f"candidate_heads.{term}"
        elif term[0] == term[1]:
            anchor_head = candidate_head = f"noact_heads.{term}"
        else:
            anchor_head = f"noact_heads.{term}_{kind_names[term[0]]}"
            candidate_head = f"noact_heads.{term}_{kind_names[term[1]]}"
        positions: list[tuple[int, int] | None] = [None]
        if "l" in term:
            positions = [(h, w) for h in range(H) for w in range(W)]
        total = 0.0
        for pos in positions:
            u = [
                reference_residual_mlp(params, anchor_head, features("anchor", term[0], i, pos) + emb[i])
                for i in range(B)
            ]
            v = [
                reference_residual_mlp(params, candidate_head, features("candidate", term[1], j, pos)) for j in range(B)
            ]
            for i in range(B):
                scores = []
                for j in range(B):
                    dot = sum(a * b for a, b in zip(u[i], v[j], strict=True)) / math.sqrt(RKHS)
                    scores.append(CLIP * math.tanh(dot / CLIP))
                top = max(scores)
                log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
                total += -(scores[i] - log_norm)
        losses[term] = total / (len(positions) * B)
    return losses


def reference_projection(
    support: list[float], probs: np.ndarray, returns: list[float], discounts: list[float]
) -> list[list[float]]:
    """Bellemare et al. 2017, Alg. 1, one sample and one atom at a time; an atom landing on an atom keeps its mass."""
    n, v_min, v_max = len(support), support[0], support[-1]
    dz = (v_max - v_min) / (n - 1)
    out = []
    for i in range(len(returns)):
        row = [0.0] * n
        for j in range(n):
            tz = min(max(returns[i] + discounts[i] * support[j], v_min), v_max)
            b = (tz - v_min) / dz
            lo, hi = math.floor(b), math.ceil(b)
            if lo == hi:
                row[lo] += float(probs[i, j])
            else:
                row[lo] += float(probs[i, j]) * (hi - b)
                row[hi] += float(probs[i, j]) * (b - lo)
        out.append(row)
    return out


def reference_cross_entropy(logits: np.ndarray, target: list[list[float]]) -> list[float]:
    """-sum_j target_j log softmax(logits)_j per sample."""
    out = []
    for i in range(logits.shape[0]):
        row = [float(x) for x in logits[i]]
        top = max(row)
        log_norm = top + math.log(sum(math.exp(x - top) for x in row))
        out.append(-sum(t * (x - log_norm) for t, x in zip(target[i], row, strict=True)))
    return out


# ----------------------------------------------------------------------------------------------- the pinned literals

EXPECTED_INFONCE = {
    True: {"ll": 1.90350052578, "lg": 1.12158635491, "gl": 1.31473514424, "gg": 1.27746194009},
    False: {"ll": 1.13048234591, "lg": 1.34357084763, "gl": 1.13110961887, "gg": 3.00622934466},
}

C51_SUPPORT = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
# a generic shift and shrink, a 7-step bootstrap, a terminal, a return beyond v_max, an exact one-atom shift down
C51_RETURNS = [0.3, -0.75, 1.25, 5.0, -1.0]
C51_DISCOUNTS = [0.9, 0.99**7, 0.0, 0.5, 1.0]
EXPECTED_PROJECTION: list[list[float]] = [
    [0.0040785648769, 0.045720769439, 0.080257286092, 0.1881854628, 0.32815810954, 0.2556956912, 0.097904116051],
    [0.266514809055, 0.183367713643, 0.0748105882336, 0.197037446559, 0.0574133281531, 0.210751273723, 0.0101048406331],
    [0, 0, 0, 0, 0.75, 0.25, 0],
    [0, 0, 0, 0, 0, 0, 1],
    [0.180653596908, 0.0759977627547, 0.1565715808, 0.0285191879182, 0.0338765003957, 0.524381371223, 0],
]
EXPECTED_CROSS_ENTROPY: list[float] = [2.19038613758, 2.37272477508, 2.85909809187, 2.64286072811, 2.46646726132]


def c51_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap probabilities (a softmax of fixed numbers) and predicted logits, (5, 7) each."""
    raw = 2.0 * fixed_array((5, 7), "next_logits")
    probs = np.exp(raw - raw.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), 2.0 * fixed_array((5, 7), "logits")


# ----------------------------------------------------------------------------------------------- tests


def build_critic(action_conditioned: bool) -> tuple[DIMCritic, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    critic = DIMCritic(
        TERMS,
        local_channels=C,
        global_dim=D,
        num_actions=NUM_ACTIONS,
        action_dim=ACTION_DIM,
        rkhs_dim=RKHS,
        clip=CLIP,
        action_conditioned=action_conditioned,
    )
    return critic, fixed_parameters(critic)


@pytest.mark.parametrize("action_conditioned", [True, False], ids=["action", "noact"])
def test_critic_infonce_terms_match_the_pinned_values(action_conditioned):
    critic, params = build_critic(action_conditioned)
    x = {k: torch.from_numpy(v).float() for k, v in fixed_inputs().items()}
    anchor = Features(local=x["anchor_local"], global_=x["anchor_global"])
    candidate = Features(local=x["candidate_local"], global_=x["candidate_global"])
    with torch.no_grad():
        losses = critic(anchor, torch.tensor(ACTIONS), candidate)
    expected = EXPECTED_INFONCE[action_conditioned]
    assert set(losses) == set(expected)
    for term, value in expected.items():
        torch.testing.assert_close(losses[term].double(), torch.tensor(value, dtype=torch.float64), **PROJECT)
    reference = reference_infonce(params, fixed_inputs(), ACTIONS, action_conditioned)
    for term, value in expected.items():
        assert reference[term] == pytest.approx(value, **REFERENCE), term


def test_c51_projection_and_cross_entropy_match_the_pinned_values():
    probs, logits = c51_inputs()
    target = categorical_projection(
        torch.tensor(C51_SUPPORT),
        torch.from_numpy(probs).float(),
        torch.tensor(C51_RETURNS),
        torch.tensor(C51_DISCOUNTS),
    )
    loss = c51_cross_entropy(torch.from_numpy(logits).float(), target)
    torch.testing.assert_close(target.double(), torch.tensor(EXPECTED_PROJECTION, dtype=torch.float64), **PROJECT)
    torch.testing.assert_close(loss.double(), torch.tensor(EXPECTED_CROSS_ENTROPY, dtype=torch.float64), **PROJECT)
    reference = reference_projection(C51_SUPPORT, probs, C51_RETURNS, C51_DISCOUNTS)
    assert np.array(reference) == pytest.approx(np.array(EXPECTED_PROJECTION), **REFERENCE)
    assert reference_cross_entropy(logits, reference) == pytest.approx(EXPECTED_CROSS_ENTROPY, **REFERENCE)

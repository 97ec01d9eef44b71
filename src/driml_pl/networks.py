"""The paper's networks (spec §2.2-2.3, §4): Nature-DQN encoder, C51 head, and the DIM critic heads."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RELU_GAIN = math.sqrt(2.0)


def one_hot(ids: Tensor, n: int) -> Tensor:
    """Float one-hot rows of integer ids in [0, n). Unlike ``F.one_hot`` it never reads the ids back to check them
    (``F.one_hot`` does on the CPU), so it is the same few ops on every device. Shape: (...,) -> (..., n)."""
    return (ids.unsqueeze(-1) == torch.arange(n, device=ids.device)).float()


def preprocess(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 frame stacks to float network input, resized on the device. Used by acting and learning alike.

    The resize is nearest-neighbour, done on uint8 before the float conversion: for the paper's up-scale from 64x64
    to 104x80 it replicates pixels (the released code used cv2 INTER_AREA on the CPU). Bilinear resizing cost a
    fifth of a CPU update for no information gain.

    Shape:
        frames: (B, S, H, W, C) uint8. Returns: (B, S*C, size[0], size[1]) float in [0, 1].
    """
    b, s, h, w, c = frames.shape
    out_h, out_w = size
    if (h, w) != (out_h, out_w):  # rows of whole HWC pixels are cheaper to gather than single channel planes
        rows = (torch.arange(out_h, device=frames.device) * h) // out_h
        cols = (torch.arange(out_w, device=frames.device) * w) // out_w
        frames = frames.index_select(2, rows).index_select(3, cols)
    x = frames.permute(0, 1, 4, 2, 3).reshape(b, s * c, out_h, out_w)
    return x.float().div_(255.0)


def _orthogonal_(layer: nn.Module, gain: float = RELU_GAIN) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)  # type: ignore[arg-type]
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
    return layer


def _kaiming_(layer: nn.Module) -> nn.Module:
    """``kaiming_uniform_(a=0, mode="fan_in", nonlinearity="relu")``: U(-b, b) with b = sqrt(6 / fan_in); bias 0."""
    nn.init.kaiming_uniform_(layer.weight, a=0, mode="fan_in", nonlinearity="relu")  # type: ignore[arg-type]
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
    return layer


class Features(NamedTuple):
    local: Tensor  # (B, 64, H', W') conv3 after ReLU
    global_: Tensor  # (B, 512) fc before ReLU


class NatureEncoder(nn.Module):
    """Nature-DQN trunk: conv 32/8/4, 64/4/2, 64/3/1 (ReLU each) then fc 512, orthogonal init with gain sqrt(2).

    Args:
        in_channels: 3 * frame stack.
        obs_size: (H, W) the frames are resized to (paper: 104 x 80).
        feature_dim: width of the fc layer (paper: 512).
    """

    def __init__(self, in_channels: int = 3, obs_size: tuple[int, int] = (104, 80), feature_dim: int = 512) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            _orthogonal_(nn.Conv2d(in_channels, 32, 8, stride=4)),
            nn.ReLU(),
            _orthogonal_(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            _orthogonal_(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
        )
        with torch.no_grad():
            local = self.convs(torch.zeros(1, in_channels, *obs_size))
        self.local_channels = local.shape[1]
        self.local_shape = tuple(local.shape[2:])  # (9, 6) for 104 x 80
        self.feature_dim = feature_dim
        self.fc = _orthogonal_(nn.Linear(local[0].numel(), feature_dim))

    def forward(self, x: Tensor) -> Features:
        local = self.convs(x)
        return Features(local=local, global_=self.fc(local.flatten(1)))


class C51Head(nn.Module):
    """ReLU(fc) -> Linear -> per-action atom logits (PyTorch default init, as in the paper)."""

    def __init__(self, feature_dim: int, num_actions: int, num_atoms: int) -> None:
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.out = nn.Linear(feature_dim, num_actions * num_atoms)

    def forward(self, global_features: Tensor) -> Tensor:
        """Shape: (B, feature_dim) -> logits (B, num_actions, num_atoms)."""
        return self.out(F.relu(global_features)).view(-1, self.num_actions, self.num_atoms)


class QNetwork(nn.Module):
    """Encoder + C51 head; the unit copied into the target network."""

    def __init__(
        self, in_channels: int, obs_size: tuple[int, int], feature_dim: int, num_actions: int, num_atoms: int
    ) -> None:
        super().__init__()
        self.encoder = NatureEncoder(in_channels, obs_size, feature_dim)
        self.head = C51Head(feature_dim, num_actions, num_atoms)

    def forward(self, x: Tensor) -> tuple[Features, Tensor]:
        features = self.encoder(x)
        return features, self.head(features.global_)


class ResidualMLP(nn.Module):
    """``out(x) = W x + L2(ReLU(L1(x)))`` on vectors, or on every position with 1x1 convs (``spatial=True``).

    Init follows the released code (``ResBlock_conv``, ``ResBlock_fc``): spatial heads pass all three layers through
    the init function, with a biased skip; vector heads pass only their bias-free skip through it and keep PyTorch's
    default init for the inner layers. The init function is orthogonal with ReLU gain (``init="orthogonal"``, the
    action-conditioned heads) or ``kaiming_uniform_`` with ReLU gain (``init="kaiming"``, DRIML-noact's heads), biases
    zero in both.
    """

    def __init__(self, in_dim: int, out_dim: int, spatial: bool, init: str = "orthogonal") -> None:
        super().__init__()
        inits = {"orthogonal": _orthogonal_, "kaiming": _kaiming_}
        if init not in inits:
            raise ValueError(f"unknown head init {init!r}; valid: {', '.join(inits)}")
        if spatial:
            self.l1: nn.Module = nn.Conv2d(in_dim, out_dim, 1)
            self.l2: nn.Module = nn.Conv2d(out_dim, out_dim, 1)
            self.skip: nn.Module = nn.Conv2d(in_dim, out_dim, 1)
            for layer in (self.l1, self.l2, self.skip):
                inits[init](layer)
        else:
            self.l1 = nn.Linear(in_dim, out_dim)
            self.l2 = nn.Linear(out_dim, out_dim)
            self.skip = inits[init](nn.Linear(in_dim, out_dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.l2(F.relu(self.l1(x)))


class ActionEncoder(nn.Module):
    """One-hot action -> 64-d embedding with a residual MLP (spec §2.3)."""

    def __init__(self, num_actions: int, dim: int = 64) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.net = ResidualMLP(num_actions, dim, spatial=False)
        for layer in (self.net.l1, self.net.l2):
            _orthogonal_(layer)

    def forward(self, actions: Tensor) -> Tensor:
        return self.net(one_hot(actions, self.num_actions))

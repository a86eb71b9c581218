"""The networks of distributed RL, their flat-vector form for sending, and saved policies.

* :class:`ActorCritic`: policy ``pi(a|s)`` and value ``V(s)``, two tanh MLPs as in CleanRL's PPO (A2C, A3C,
  PPO, the naive parallel rollouts).
* :class:`QNetwork`: ``Q(s, .)`` for DQN/Gorila.
* For image observations (MinAtar, Atari) both start with a convolution (:class:`ImageInput` unflattens the
  observations, see :func:`_torso`).
* :func:`flat_parameters` / :func:`load_flat_parameters`: all weights as one vector and back.
* :func:`save_policy` / :func:`load_policy`: a ``weights_only`` checkpoint with what rebuilds the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.errors import CheckpointError

__all__ = [
    "ActorCritic",
    "ImageInput",
    "QNetwork",
    "flat_parameters",
    "load_flat_parameters",
    "load_policy",
    "save_policy",
]


def _layer(inputs: int, outputs: int, gain: float = math.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(layer.weight, gain)  # orthogonal init, as in the PPO/A3C baselines
    nn.init.zeros_(layer.bias)
    return layer


class ImageInput(nn.Module):
    """Flat observations ``[B, H W C]`` back to images ``[B, C, H, W]`` for a convolution."""

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], *self.image_shape).permute(0, 3, 1, 2)


def _torso(obs_dim: int, image_shape: tuple[int, int, int] | None, hidden: int, activation: type) -> list:
    """First layers: ``Linear(obs_dim, hidden)`` for vector states; for small images, MinAtar's network
    (Young and Tian 2019): one 3x3 convolution with 16 filters, stride 1, ReLU, then ``Linear(., hidden)``;
    for Atari-sized images (32 pixels or more) the Nature DQN's three convolutions (Mnih et al. 2015:
    32 8x8 stride 4, 64 4x4 stride 2, 64 3x3 stride 1, ReLUs), then ``Linear(., hidden)``."""
    if image_shape is None:
        return [_layer(obs_dim, hidden), activation()]
    height, width, channels = image_shape
    if min(height, width) >= 32:
        convs = [nn.Conv2d(channels, 32, 8, stride=4), nn.Conv2d(32, 64, 4, stride=2), nn.Conv2d(64, 64, 3)]
        layers: list[nn.Module] = [ImageInput(image_shape)]
        for conv in convs:
            nn.init.orthogonal_(conv.weight, math.sqrt(2))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
        with torch.no_grad():
            flat = nn.Sequential(*layers)(torch.zeros(1, obs_dim)).numel()
        return [*layers, nn.Flatten(), _layer(flat, hidden), activation()]
    conv = nn.Conv2d(channels, 16, kernel_size=3, stride=1)
    nn.init.orthogonal_(conv.weight, math.sqrt(2))
    nn.init.zeros_(conv.bias)
    flat = 16 * (height - 2) * (width - 2)
    return [ImageInput(image_shape), conv, nn.ReLU(), nn.Flatten(), _layer(flat, hidden), activation()]


class ActorCritic(nn.Module):
    """Policy ``pi(a|s; theta)`` and value ``V(s; theta_v)``: two MLPs (tanh), no shared layers.

    Sizes as CleanRL's PPO for classic control: ``hidden=64``, two hidden layers each. The policy's last
    layer starts near zero (gain 0.01), so the first policy is almost uniform. With ``image_shape``
    (MinAtar) each of the two starts with MinAtar's small convolution (see :func:`_torso`).
    """

    kind = "actor-critic"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden: int = 64,
        *,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim, self.num_actions, self.hidden = obs_dim, num_actions, hidden
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.critic = nn.Sequential(
            *_torso(obs_dim, self.image_shape, hidden, nn.Tanh),
            _layer(hidden, hidden),
            nn.Tanh(),
            _layer(hidden, 1, 1.0),
        )
        self.actor = nn.Sequential(
            *_torso(obs_dim, self.image_shape, hidden, nn.Tanh),
            _layer(hidden, hidden),
            nn.Tanh(),
            _layer(hidden, num_actions, 0.01),
        )

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits ``[B, A]`` and values ``[B]``."""
        return self.actor(obs), self.critic(obs).squeeze(-1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The most probable action (for ``distlearn rl play``)."""
        return self.actor(obs).argmax(-1)


class QNetwork(nn.Module):
    """Action values ``Q(s, a; theta)`` for every action: an MLP (ReLU), DQN's network for vector states;
    with ``image_shape`` (MinAtar) MinAtar's DQN network: one 16-filter 3x3 convolution, then the MLP."""

    kind = "q"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden: int = 128,
        *,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim, self.num_actions, self.hidden = obs_dim, num_actions, hidden
        self.image_shape = None if image_shape is None else tuple(image_shape)
        first = (
            [nn.Linear(obs_dim, hidden), nn.ReLU()]
            if self.image_shape is None
            else _torso(obs_dim, self.image_shape, hidden, nn.ReLU)
        )
        self.net = nn.Sequential(
            *first,
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_actions),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The greedy action ``argmax_a Q(s, a)``."""
        return self.net(obs).argmax(-1)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one flat float32 vector (a copy), for sending."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a vector made by :func:`flat_parameters` back into ``model``."""
    torch.nn.utils.vector_to_parameters(flat, list(model.parameters()))


def save_policy(path: str | Path, model: ActorCritic | QNetwork, env_id: str, **info: Any) -> Path:
    """Save ``model``'s weights and what is needed to rebuild it (``weights_only``-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": model.kind,
        "env_id": env_id,
        "obs_dim": model.obs_dim,
        "num_actions": model.num_actions,
        "hidden": model.hidden,
        "image_shape": list(model.image_shape) if model.image_shape is not None else None,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "info": info,
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def load_policy(path: str | Path) -> tuple[ActorCritic | QNetwork, str]:
    """Rebuild a policy saved by :func:`save_policy`; returns ``(model, env_id)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no policy at {path}; train one with `distlearn rl ppo ... --out DIR` first")
    try:
        payload = torch.load(path, weights_only=True)
        cls = {"actor-critic": ActorCritic, "q": QNetwork}[payload["kind"]]
        image_shape = payload.get("image_shape")  # absent in policies saved before MinAtar support
        model = cls(
            payload["obs_dim"],
            payload["num_actions"],
            payload["hidden"],
            image_shape=None if image_shape is None else tuple(image_shape),
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a distlearn rl policy ({error}); pass the policy.pt of a run"
        ) from error
    model.eval()
    return model, str(payload["env_id"])

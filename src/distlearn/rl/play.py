"""``distlearn rl play``: run a saved policy greedily, print its returns, render an episode to a GIF (Pillow).

    distlearn rl play runs/rl-sync-pg/policy.pt --episodes 10 --gif docs/img/rl-cartpole.gif

Actor-critic policies take ``argmax_a pi(a|s)``, Q-networks ``argmax_a Q(s, a)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distlearn.errors import ConfigError, require_extra
from distlearn.rl.common import load_policy, make_env

__all__ = ["play"]


def play(
    policy: str | Path,
    *,
    episodes: int = 5,
    gif: str | Path | None = None,
    max_frames: int = 500,
    seed: int = 0,
) -> list[float]:
    """Returns of ``episodes`` greedy episodes; the first one is written to ``gif`` when given."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    model, env_id = load_policy(policy)
    returns = []
    frames = []
    for episode in range(episodes):
        recording = gif is not None and episode == 0
        env = make_env(env_id, seed + episode, render_mode="rgb_array" if recording else None)
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            if recording and len(frames) < max_frames:
                try:
                    frames.append(env.render())
                except Exception as error:  # gymnasium's DependencyNotInstalled when pygame is missing
                    if "pygame" not in str(error):
                        raise
                    raise ConfigError(
                        f"rendering {env_id} needs pygame: pip install pygame ({error})"
                    ) from error
            with torch.no_grad():
                action = int(model.act(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        env.close()
        returns.append(total)
    if gif is not None:
        _write_gif(frames, Path(gif))
    return returns


def _write_gif(frames: list, path: Path, every: int = 2, width: int = 300) -> None:
    require_extra("PIL", "plot", "distlearn rl play --gif (Pillow)")
    from PIL import Image

    if not frames:
        raise ConfigError("the episode produced no frames to write")
    images = []
    for frame in frames[::every]:  # every other frame at 25 fps: real time for CartPole's 50 Hz
        image = Image.fromarray(frame)
        image = image.resize((width, round(image.height * width / image.width)))
        images.append(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0, optimize=True)

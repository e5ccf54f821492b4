"""Render a synthetic scene from its front camera by inverse perspective.

Every pixel's ray is intersected with the ground plane (``srdrl.camera.unproject_to_ground``);
the ground point takes the colour of the terrain there: the dirt track, the shoulders or a
hazard. Rays at or above the horizon see the sky. Surface roughness is per-pixel luminance
noise whose strength depends on the terrain class, so a class keeps the same Laplacian
texture at every distance (world-space texture would alias into false roughness far
away). The classes are built to differ as real ones do:

==========  ==================  ==========================================
class       colour (RGB)        texture (Laplacian variance of the gray)
==========  ==================  ==========================================
track       light tan           low (noise sigma 1.8)
shoulder    olive brown         rough (sigma 6)
mud         dark wet brown      medium-high (sigma 7.5, wet glints)
rocks       grey                high (sigma 14, bright and dark stones)
water       blue-grey           very low (sigma 1), strongly different colour
==========  ==================  ==========================================
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from srdrl.camera import pixel_grid, pose_matrix, unproject_to_ground
from srdrl.data.scenes import Scene

# (colour RGB, luminance noise sigma) per terrain class
TERRAIN = {
    "track": (np.array([168.0, 138.0, 102.0]), 1.8),
    "shoulder": (np.array([112.0, 108.0, 66.0]), 6.0),
    "mud": (np.array([76.0, 56.0, 40.0]), 7.5),
    "rocks": (np.array([132.0, 130.0, 126.0]), 14.0),
    "water": (np.array([66.0, 96.0, 128.0]), 1.0),
}
SKY_TOP = np.array([118.0, 160.0, 220.0])
SKY_HORIZON = np.array([198.0, 214.0, 232.0])
TRACK_EDGE_BLEND = 0.6  # metres over which the track fades into the shoulder


def camera_at_history_pose(T_cam_from_ego: np.ndarray, pose_xyyaw: tuple) -> np.ndarray:
    """Camera transform for a frame taken at an earlier ego pose (in the t0 ego frame)."""
    pose = pose_matrix(*pose_xyyaw).numpy()
    return T_cam_from_ego @ np.linalg.inv(pose)


@functools.lru_cache(maxsize=4)
def _ground_under_pixels(width: int, height: int, K_bytes: bytes, T_bytes: bytes):
    """Ground x, y (H, W) under every pixel and the sky mask; cached: every scene's t0 frame
    shares one camera."""
    K = torch.from_numpy(np.frombuffer(K_bytes, dtype=np.float64).reshape(3, 3).copy())
    T = torch.from_numpy(np.frombuffer(T_bytes, dtype=np.float64).reshape(4, 4).copy())
    ground, hits = unproject_to_ground(pixel_grid(width, height), K, T)
    return ground[..., 0].numpy(), ground[..., 1].numpy(), hits.numpy()


def render_frame(
    scene: Scene,
    K: np.ndarray,
    T_cam_from_ego: np.ndarray,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one uint8 RGB frame (H, W, 3). ``T_cam_from_ego`` maps t0-ego points."""
    K = np.ascontiguousarray(K, dtype=np.float64)
    T_cam_from_ego = np.ascontiguousarray(T_cam_from_ego, dtype=np.float64)
    x, y, hits = _ground_under_pixels(width, height, K.tobytes(), T_cam_from_ego.tobytes())

    # Track versus shoulder, blended across the edge.
    lateral = np.abs(y - scene.centreline_y(x))
    w = np.clip((scene.track_half_width + TRACK_EDGE_BLEND / 2 - lateral) / TRACK_EDGE_BLEND, 0, 1)
    track_rgb, track_sigma = TERRAIN["track"]
    shoulder_rgb, shoulder_sigma = TERRAIN["shoulder"]
    rgb = w[..., None] * track_rgb + (1 - w[..., None]) * shoulder_rgb
    sigma = w * track_sigma + (1 - w) * shoulder_sigma
    rgb = rgb + scene.palette_jitter

    glints = np.zeros_like(x)
    for hazard in scene.hazards:
        inside = hits & hazard.contains(x, y, bounded=True)
        h_rgb, h_sigma = TERRAIN[hazard.kind]
        rgb[inside] = h_rgb
        sigma[inside] = h_sigma
        if hazard.kind == "mud":  # wet glints: sparse bright specks
            glints[inside] = (rng.random(int(inside.sum())) < 0.04) * 60.0
        elif hazard.kind == "rocks":  # stones: bright tops and dark gaps
            glints[inside] = rng.choice([-40.0, 0.0, 40.0], size=int(inside.sum()),
                                        p=[0.1, 0.8, 0.1])

    luminance_noise = rng.standard_normal(x.shape, dtype=np.float32) * sigma + glints
    ground_rgb = scene.colour_gain * rgb + luminance_noise[..., None]
    ground_rgb += rng.standard_normal(rgb.shape, dtype=np.float32)  # sensor noise per channel

    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = SKY_TOP + (SKY_HORIZON - SKY_TOP) * rows
    image = np.where(hits[..., None], ground_rgb, np.broadcast_to(sky, ground_rgb.shape))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_frames(
    scene: Scene,
    K: np.ndarray,
    T_cam_from_ego: np.ndarray,
    width: int,
    height: int,
    num_frames: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Frames at the last ``num_frames`` history poses (10 Hz), the last one at t0."""
    hist = scene.history
    frames = []
    for k in range(len(hist) - num_frames, len(hist)):
        x, y = hist[k, 0], hist[k, 1]
        yaw = float(np.arctan(scene.curvature * x))  # centreline tangent
        T = camera_at_history_pose(T_cam_from_ego, (x, y, yaw))
        frames.append(render_frame(scene, K, T, width, height, rng))
    return frames

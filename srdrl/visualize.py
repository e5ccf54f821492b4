"""Pictures: trajectories projected onto camera frames (Pillow only)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from srdrl.camera import project_points, visible

COLOURS = {
    "label": (255, 60, 60),  # the (possibly noisy) labelled trajectory
    "clean": (40, 220, 90),  # the clean trajectory
    "prediction": (60, 140, 255),
}


def draw_trajectories(
    image: np.ndarray,
    trajectories: list[np.ndarray],
    colours: list[tuple[int, int, int]],
    K: np.ndarray,
    T_cam_from_ego: np.ndarray,
    scale: int = 1,
    width: int = 2,
) -> Image.Image:
    """Draw each ego-frame trajectory (T, 2 or 3) onto ``image`` (H, W, 3) as a polyline.

    Only visible waypoints are drawn; the line breaks where the path leaves the image.
    ``scale`` enlarges the picture (nearest neighbour) before drawing.
    """
    h, w = image.shape[:2]
    pic = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    Kt, Tt = torch.as_tensor(K, dtype=torch.float64), torch.as_tensor(T_cam_from_ego,
                                                                      dtype=torch.float64)
    for traj, colour in zip(trajectories, colours, strict=True):
        pts = torch.as_tensor(np.asarray(traj, dtype=np.float64))
        if pts.shape[-1] == 2:
            pts = torch.cat([pts, torch.zeros_like(pts[:, :1])], dim=-1)
        uv, z = project_points(pts, Kt, Tt)
        vis = visible(uv, z, w, h).numpy()
        uv = (uv.numpy() + 0.5) * scale - 0.5
        run: list[tuple[float, float]] = []
        for point, ok in zip(uv, vis, strict=True):
            if ok:
                run.append((float(point[0]), float(point[1])))
            elif run:
                draw.line(run, fill=colour, width=width)
                run = []
        if len(run) > 1:
            draw.line(run, fill=colour, width=width)
    return pic


def tile(pictures: list[Image.Image], columns: int) -> Image.Image:
    """Arrange equally sized pictures in a grid."""
    w, h = pictures[0].size
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, pic in enumerate(pictures):
        sheet.paste(pic, ((i % columns) * w, (i // columns) * h))
    return sheet

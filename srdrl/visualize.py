"""Pictures: trajectories on camera frames (Pillow), bird's-eye views and training curves
(matplotlib, the ``plot`` extra, imported only when a plot is drawn)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from srdrl.camera import project_points, visible

COLOURS = {
    "label": (255, 60, 60),  # the (possibly noisy) labelled trajectory
    "clean": (40, 220, 90),  # the clean trajectory
    "prediction": (60, 140, 255),
    "sample": (150, 200, 255),  # the other policy samples of the scene
}
HAZARD_COLOURS = {"mud": "#7a5230", "rocks": "#8c8c8c", "water": "#3b7dd8"}


# --------------------------------------------------------------------------- camera frames


def draw_trajectories(
    image: np.ndarray,
    trajectories: list[np.ndarray],
    colours: list[tuple[int, int, int]],
    K: np.ndarray,
    T_cam_from_ego: np.ndarray,
    scale: float = 1,
    width: int | list[int] = 2,
) -> Image.Image:
    """Draw each ego-frame trajectory (T, 2 or 3) onto ``image`` (H, W, 3) as a polyline.

    Only visible waypoints are drawn; the line breaks where the path leaves the image.
    ``scale`` resizes the picture before drawing (nearest neighbour up, area-averaged
    down), so lines stay sharp at any size. ``width`` is one line width or one per path.
    """
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.BOX
    pic = Image.fromarray(image).resize(size, resample)
    draw = ImageDraw.Draw(pic)
    widths = width if isinstance(width, (list, tuple)) else [width] * len(trajectories)
    Kt, Tt = torch.as_tensor(K, dtype=torch.float64), torch.as_tensor(T_cam_from_ego,
                                                                      dtype=torch.float64)
    for traj, colour, line_width in zip(trajectories, colours, widths, strict=True):
        pts = torch.as_tensor(np.asarray(traj, dtype=np.float64))
        if pts.shape[-1] == 2:
            pts = torch.cat([pts, torch.zeros_like(pts[:, :1])], dim=-1)
        uv, z = project_points(pts, Kt, Tt)
        vis = visible(uv, z, w, h).numpy()
        uv = (uv.numpy() + 0.5) * (size[0] / w) - 0.5
        run: list[tuple[float, float]] = []
        for point, ok in zip(uv, vis, strict=True):
            if ok:
                run.append((float(point[0]), float(point[1])))
            elif run:
                draw.line(run, fill=colour, width=line_width)
                run = []
        if len(run) > 1:
            draw.line(run, fill=colour, width=line_width)
    return pic


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def caption(
    pic: Image.Image, title: str, legend: list[tuple[str, tuple[int, int, int]]]
) -> Image.Image:
    """``pic`` above a white strip with ``title`` (split at ``\\n`` and wrapped to the
    picture's width) and a legend line (colour swatch, name)."""
    font = _font(12)
    columns = max(20, pic.width // 7)  # characters of the 12 px font per line, about
    lines = [part for line in title.split("\n") for part in textwrap.wrap(line, columns)]
    strip = 20 + 16 * len(lines)
    out = Image.new("RGB", (pic.width, pic.height + strip), (255, 255, 255))
    out.paste(pic, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, pic.height + 2 + 16 * i), line, fill=(0, 0, 0), font=font)
    x, y = 4, pic.height + 4 + 16 * len(lines)
    for name, colour in legend:
        draw.rectangle((x, y + 3, x + 14, y + 8), fill=colour)
        draw.text((x + 18, y - 2), name, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    return out


def tile(pictures: list[Image.Image], columns: int) -> Image.Image:
    """Arrange pictures in a grid of cells as large as the largest picture."""
    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, pic in enumerate(pictures):
        sheet.paste(pic, ((i % columns) * w, (i // columns) * h))
    return sheet


def frame_scale(width: int, target: int = 512) -> float:
    """Integer enlargement of small frames toward ``target`` pixels wide; large ones shrink."""
    if width < target:
        return float(max(1, round(target / width)))
    return min(1.0, 1.25 * target / width)


def camera_sheet(scenes: list[dict], path: str | Path, columns: int = 2) -> Path:
    """Camera frames of several scenes, tiled, with label, clean path and predictions.

    Each scene is a dict with ``image`` (H, W, 3) uint8, ``K``, ``T_cam_from_ego``,
    ``label``, ``clean`` (T, 2+), ``predictions`` (K, T, 2+; the first is the prediction),
    ``label_noisy`` and ``title``. The sky above 0.3 H and a tenth of each side are cropped
    away: the paths and hazards lie on the ground ahead.
    """
    pics = []
    for s in scenes:
        h, w = s["image"].shape[:2]
        scale = frame_scale(w)
        preds = list(np.asarray(s["predictions"]))
        paths = preds[1:] + [s["clean"], s["label"], preds[0]]
        colours = [COLOURS["sample"]] * (len(preds) - 1) + [
            COLOURS["clean"], COLOURS["label"], COLOURS["prediction"]]
        widths = [1] * (len(preds) - 1) + [3, 2, 3]
        pic = draw_trajectories(s["image"], paths, colours, s["K"], s["T_cam_from_ego"],
                                scale=scale, width=widths)
        pic = pic.crop((round(0.1 * pic.width), round(0.3 * pic.height),
                        round(0.9 * pic.width), pic.height))
        legend = [("label (noisy)" if s["label_noisy"] else "label", COLOURS["label"]),
                  ("clean", COLOURS["clean"]), ("prediction", COLOURS["prediction"])]
        if len(preds) > 1:
            legend.append(("other samples", COLOURS["sample"]))
        pics.append(caption(pic, s["title"], legend))
    keep = [(0, 0, 0), (255, 255, 255), *COLOURS.values()]
    return save_small_png(tile(pics, min(columns, len(pics))), path, keep=keep)


def save_small_png(pic: Image.Image, path: str | Path, colours: int = 64,
                   keep: list[tuple[int, int, int]] = ()) -> Path:
    """Save with a palette: rendered terrain is noisy, and a palette keeps it to ~100s of KB.

    The colours in ``keep`` (the paths' and the text's) go into the palette exactly, so
    that the terrain's many greens and browns cannot swallow them.
    """
    path = Path(path)
    keep = list(dict.fromkeys(keep))
    base = pic.quantize(colors=max(colours - len(keep), 2), method=Image.Quantize.MEDIANCUT)
    palette = base.getpalette()[: 3 * max(colours - len(keep), 2)]
    palette += [c for colour in keep for c in colour]
    palette_image = Image.new("P", (1, 1))
    palette_image.putpalette(palette + [0] * (768 - len(palette)))
    pic.convert("RGB").quantize(palette=palette_image, dither=Image.Dither.NONE).save(
        path, optimize=True)
    return path


# --------------------------------------------------------------------------- matplotlib


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'srdrl[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def footprint_band(path_xy: np.ndarray, half_width: float) -> np.ndarray:
    """Closed polygon (2T, 2) covering a vehicle of ``half_width`` along ``path_xy`` (T, 2).

    Each point is pushed sideways along the normal of its local direction (central
    differences); a path standing still keeps the last direction it had.
    """
    p = np.asarray(path_xy, dtype=np.float64)[:, :2]
    d = np.gradient(p, axis=0) if len(p) > 1 else np.array([[1.0, 0.0]])
    norm = np.linalg.norm(d, axis=1)
    heading = np.array([1.0, 0.0])
    for i in range(len(d)):  # carry the heading through stops
        if norm[i] > 1e-6:
            heading = d[i] / norm[i]
        d[i] = heading
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1)
    return np.concatenate([p + half_width * normal, (p - half_width * normal)[::-1]])


def plot_birds_eye(
    path: str | Path,
    hazards: list[dict],
    label: np.ndarray,
    clean: np.ndarray,
    predictions: np.ndarray,
    half_width: float,
    title: str = "",
    label_noisy: bool = False,
) -> Path:
    """Top view of one scene, ego frame (x forward up the page, y left to the left).

    Hazard footprints are filled by kind (in-path ones opaque, shoulder ones faint); the
    first of ``predictions`` (K, T, 2+) is the prediction, with the vehicle's footprint
    (``half_width`` each side) as a band; the others are thin.
    """
    plt = pyplot()
    from matplotlib.patches import Patch, Polygon, Rectangle

    fig, ax = plt.subplots(figsize=(4.2, 5.6), dpi=90)

    def draw(xy, **kw):  # plot (x, y) with y on the horizontal axis, left to the left
        xy = np.concatenate([np.zeros((1, 2)), np.asarray(xy)[:, :2]])
        ax.plot(xy[:, 1], xy[:, 0], **kw)

    kinds = set()
    for h in hazards:
        fp = np.asarray(h["footprint"])[:, ::-1]
        colour = HAZARD_COLOURS.get(h["kind"], "#aa66cc")
        ax.add_patch(Polygon(fp, closed=True, facecolor=colour, edgecolor=colour,
                             alpha=0.75 if h.get("in_path") else 0.3, lw=1))
        kinds.add(h["kind"])
    pred = np.asarray(predictions)
    band = footprint_band(np.concatenate([np.zeros((1, 2)), pred[0, :, :2]]), half_width)
    ax.add_patch(Polygon(band[:, ::-1], closed=True, facecolor=_rgb(COLOURS["prediction"]),
                         alpha=0.2, lw=0))
    for k in range(1, len(pred)):
        draw(pred[k], color=_rgb(COLOURS["sample"]), lw=0.8,
             label="other samples" if k == 1 else None)
    draw(clean, color=_rgb(COLOURS["clean"]), lw=2, label="clean")
    draw(label, color=_rgb(COLOURS["label"]), lw=1.6, ls="--" if label_noisy else "-",
         label="label (noisy)" if label_noisy else "label")
    draw(pred[0], color=_rgb(COLOURS["prediction"]), lw=2,
         label=f"prediction (band: +-{half_width:g} m)")
    ax.add_patch(Rectangle((-half_width, -2.25), 2 * half_width, 4.5, facecolor="black",
                           alpha=0.6))  # the ego vehicle, centred on the origin
    ax.plot([0], [0], marker="o", color="white", ms=3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=HAZARD_COLOURS.get(k, "#aa66cc"), alpha=0.75, label=k)
                for k in sorted(kinds)]
    ax.legend(handles=handles, fontsize=6.5, loc="upper left", framealpha=0.85)
    everything = [np.zeros((1, 2)), np.asarray(label)[:, :2], np.asarray(clean)[:, :2],
                  pred[..., :2].reshape(-1, 2)] + [np.asarray(h["footprint"]) for h in hazards]
    pts = np.concatenate(everything)
    x_hi = max(pts[:, 0].max(), 10.0) + 2
    y_span = max(np.abs(pts[:, 1]).max() + 2, 6.0)
    ax.set_xlim(y_span, -y_span)  # left (+y) on the left
    ax.set_ylim(-5, x_hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("y (left +), m")
    ax.set_ylabel("x (forward), m")
    ax.set_title(title, fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_label_safety(
    path: str | Path, safety: np.ndarray, noisy: np.ndarray, unsafe_threshold: float,
    best_threshold: float | None = None,
) -> Path:
    """Histograms of the labels' visual safety, noisy against clean, with the gate's unsafe
    threshold and (dashed) the in-sample best-F1 threshold."""
    plt = pyplot()
    safety, noisy = np.asarray(safety, np.float64), np.asarray(noisy, bool)
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    bins = np.linspace(0.0, 1.0, 41)
    for mask, name, colour in ((~noisy, "clean labels", COLOURS["clean"]),
                               (noisy, "noisy labels", COLOURS["label"])):
        if mask.any():
            ax.hist(safety[mask], bins=bins, color=_rgb(colour), alpha=0.6,
                    label=f"{name} (n={int(mask.sum())})")
    ax.axvline(unsafe_threshold, color="black", lw=1.2,
               label=f"unsafe_threshold {unsafe_threshold:g}")
    if best_threshold is not None:
        ax.axvline(best_threshold, color="black", lw=1.2, ls="--",
                   label=f"best-F1 threshold {best_threshold:.3f} (in-sample)")
    ax.set_xlabel("visual safety of the label's path")
    ax.set_ylabel("training scenes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


CURVE_PANELS = {
    "loss terms": ("loss", "language_loss", "traj_loss", "awr_loss", "consistency_loss"),
    "reward terms": ("reward_mean", "reward_best", "safety", "gt_sim", "reasoning",
                     "gt_weight", "gate_fired"),
    "fractions of scenes": ("gt_is_best", "reasoning_manoeuvre_agreement",
                            "reasoning_side_agreement"),
}


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a trainer's metrics.jsonl, one per logged step; a resumed run's repeated
    steps keep their latest row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    by_step: dict[int, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if "step" not in row:
            raise ValueError(f"{path}:{lineno}: a metrics row needs a 'step'")
        by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f"{path}: no metrics rows")
    return [by_step[s] for s in sorted(by_step)]


def plot_training_curves(metrics_path: str | Path, out: str | Path) -> Path:
    """Loss terms, reward terms and fractions of scenes (gt_is_best; with self-reflective
    rollouts the generated reasoning's agreement with the dataset's) over steps."""
    rows = read_metrics(metrics_path)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(12, 4.2), dpi=90)
    steps = np.array([r["step"] for r in rows])
    for ax, (name, keys) in zip(axes, CURVE_PANELS.items(), strict=True):
        for key in keys:
            values = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            if np.isfinite(values).any():
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.2,
                        label=key)
        if name == "fractions of scenes":  # show them on their whole range
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # below the panel: curves fill it
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
                      frameon=False)
    fig.suptitle(str(metrics_path), fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


ABLATION_PANELS = (
    ("hazard_crossing_rate_in_path_scenes", "hazard crossing, in-the-way scenes"),
    ("reasoning_hazard_side_accuracy", "text names the hazard's side (oracle: dataset's)"),
    ("ade", "ADE to clean (m)"),
)
MODE_COLOURS = {"generated": (60, 140, 255), "oracle": (170, 170, 170), "none": (240, 160, 60)}


def plot_image_ablation(evaluation: dict, out: str | Path) -> Path:
    """The image ablation of an ``evaluate_scenes`` report: per metric a panel, per frame
    variant (own frames, hazard-free road, shuffled) one bar per reasoning mode, the mean
    over the noise seeds with their min..max as the error bar."""
    plt = pyplot()
    ablation = evaluation["image_ablation"]
    variants = list(ablation["frames"])
    per_variant = {v: evaluation["modes"] if v == "camera" else ablation[v] for v in variants}
    modes = list(evaluation["modes"])
    fig, axes = plt.subplots(1, len(ABLATION_PANELS), figsize=(12, 3.6), dpi=90)
    width = 0.8 / len(modes)
    for ax, (key, name) in zip(axes, ABLATION_PANELS, strict=True):
        for j, mode in enumerate(modes):
            means, low, high = [], [], []
            for v in variants:
                summary = per_variant[v][mode]
                seeds = [s[key] for s in summary["per_seed"] if s[key] is not None]
                mean = float(np.mean(seeds)) if seeds else np.nan
                means.append(mean)
                # max(0, .): the mean of equal values can round past them
                low.append(max(0.0, mean - min(seeds)) if seeds else 0.0)
                high.append(max(0.0, max(seeds) - mean) if seeds else 0.0)
            if np.isfinite(means).any():
                label = f"{mode} (diagnostic)" if mode == "oracle" else mode
                ax.bar(np.arange(len(variants)) + (j - (len(modes) - 1) / 2) * width, means,
                       width, yerr=[low, high], capsize=2, color=_rgb(MODE_COLOURS[mode]),
                       label=f"{label} reasoning")
        ax.set_xticks(np.arange(len(variants)), [v.replace("_", " ") for v in variants],
                      fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    seeds = " ".join(map(str, evaluation["seeds"]))
    fig.suptitle(f"image ablation on {evaluation['scenes']} scenes by reasoning mode "
                 f"(bars: mean over noise seeds {seeds}; whiskers: min..max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)

"""Pictures of the synthetic data for the README: `python docs/make_figures.py`."""

import json
import tempfile
from pathlib import Path

import numpy as np

from srdrl.data.dataset import load_image
from srdrl.data.synthetic import SyntheticDataConfig, make_dataset
from srdrl.visualize import COLOURS, draw_trajectories, tile


def main(out: Path = Path(__file__).parent / "synthetic_scenes.png") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SyntheticDataConfig(output_dir=tmp, num_scenes=60, label_noise=0.5, seed=1)
        make_dataset(cfg, progress=False)
        recs = [json.loads(x) for x in (Path(tmp) / "train.jsonl").read_text().splitlines()]
        noisy = [r for r in recs if r["label_noisy"]][:3]
        others = [r for r in recs if not r["label_noisy"] and r["hazards"]][:3]
        pics = []
        for r in noisy + others:
            cam = r["camera"]
            pics.append(draw_trajectories(
                load_image(str(Path(tmp) / r["frame_paths"][-1])),
                [r["clean_trajectory"], r["trajectory"]], [COLOURS["clean"], COLOURS["label"]],
                np.array(cam["K"]), np.array(cam["T_cam_from_ego"])))
            print(r["sample_id"], r["label_noisy"], r["reasoning"])
        # Keep the PNG small: crop to the road ahead, where the hazards are, and use a palette.
        w, h = pics[0].size
        crops = [p.crop((w // 5, h // 3, 4 * w // 5, 4 * h // 5)) for p in pics]
        tile(crops, 3).quantize(colors=128).save(out, optimize=True)
        print(out)


if __name__ == "__main__":
    main()

"""Labels the action space cannot represent, found when a dataset opens.

A label becomes a flow-matching target through ``traj_to_action``; where that target leaves
``action_in_bounds`` (|accel| <= 4 m/s^2, |curvature| <= 0.2 1/m) the label is one the
unicycle cannot drive within its limits (a reversing label needs tens of std). The dataset
warns once per file (see ``srdrl.data.dataset``); it does not refuse such labels.

The inverse costs a few ms a label (8 Levenberg-Marquardt steps on 128 x 128 systems), too
slow for every label of a 4000-scene file at open time. So a finite-difference estimate of
the controls (the inverse's own starting point) screens every label, and only labels whose
estimate passes ``LABEL_SCREEN_FRACTION`` of a bound are inverted, worst first, at most
``LABEL_CHECK_MAX`` per file.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from srdrl.action_space import (
    ACCEL_LIMIT,
    CURVATURE_LIMIT,
    action_in_bounds,
    estimate_v0,
    finite_difference_controls,
    traj_to_action,
)

LABEL_SCREEN_FRACTION = 0.9
"""A label is inverted when its finite-difference controls pass this fraction of a bound.
On 8890 synthetic paths (labels and clean paths of 4445 srdrl-make-data scenes) and 900
perturbed ones (hard stops, sudden turns, speed scaling, 2-5 cm jitter, reversing) 0.9
missed no label that the inverse puts out of bounds; except on reversing labels (whose
finite differences are far past the bounds anyway) the inverse's peak was at most 1.06x
the finite-difference one."""
LABEL_CHECK_MAX = 256
"""Most labels of one file inverted at open time (a few ms each), worst screened first."""
LABEL_CHECK_CHUNK = 64
"""Labels per batched ``traj_to_action`` call (its float64 Jacobians take 128 KB a label)."""
REPORT_FIRST = 3
"""Out-of-bounds labels named in the warning line."""


@contextlib.contextmanager
def one_torch_thread():
    """Run torch ops on one thread, then restore the thread count. The inverse is many small
    batched ops; on 2 busy shared cores two threads made it 4x slower (wall) than one,
    each op waiting for the other core at its barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def out_of_bounds_labels(records: list[dict]) -> tuple[list[tuple[int, str]], int]:
    """Labels whose ``traj_to_action`` leaves ``action_in_bounds``, worst first: [(record
    index, its largest action in words)], plus how many screened suspects were not inverted
    (past LABEL_CHECK_MAX)."""
    future = torch.as_tensor(np.stack([r["trajectory"] for r in records]))  # (S, 64, 3)
    history = torch.as_tensor(np.stack([r["ego_history_xyz"] for r in records]))  # (S, 16, 3)
    # The screen: the inverse's own starting point, finite-difference controls (S, 64) each.
    accel, curvature = finite_difference_controls(future[..., :2], estimate_v0(history))
    peak = torch.maximum(accel.abs().amax(-1) / ACCEL_LIMIT,
                         curvature.abs().amax(-1) / CURVATURE_LIMIT)  # (S,) in bounds
    suspects = torch.nonzero(peak > LABEL_SCREEN_FRACTION).flatten()
    suspects = suspects[peak[suspects].argsort(descending=True, stable=True)]
    checked = suspects[:LABEL_CHECK_MAX]
    found = []
    for chunk in checked.split(LABEL_CHECK_CHUNK):
        with one_torch_thread():
            actions = traj_to_action(future[chunk], history[chunk])  # (c, 64, 2) normalised
        outside = ~action_in_bounds(actions).flatten(1).all(-1)  # (c,)
        for k in torch.nonzero(outside).flatten().tolist():
            step, channel = divmod(int(actions[k].abs().argmax()), 2)
            found.append((int(chunk[k]), f"{('accel', 'curvature')[channel]} "
                                         f"{float(actions[k, step, channel]):+.3g} std at "
                                         f"step {step}"))
    return found, len(suspects) - len(checked)


def warn_out_of_bounds(path: Path, records: list[dict]) -> list[str]:
    """The one warning line for a file's out-of-bounds labels (stderr, rank 0 only);
    returns the ``where`` of each, worst first."""
    found, unchecked = out_of_bounds_labels(records)
    if not found and not unchecked:
        return []
    named = ", ".join(f"{records[i]['where']} ({records[i]['sample_id']}: {worst})"
                      for i, worst in found[:REPORT_FIRST])
    more = f" and {len(found) - REPORT_FIRST} more" if len(found) > REPORT_FIRST else ""
    rest = (f"; {unchecked} more labels passed the finite-difference screen but were not "
            f"inverted (at most {LABEL_CHECK_MAX} are at open time), so the count may be low"
            if unchecked else "")
    line = (f"warning: {path}: {len(found)} of {len(records)} labels need actions outside "
            f"the action space's bounds (|accel| <= {ACCEL_LIMIT:g} m/s^2, |curvature| <= "
            f"{CURVATURE_LIMIT:g} 1/m){': worst ' if named else ''}{named}{more}{rest}; they "
            f"are trained on as they are")
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print(line, file=sys.stderr, flush=True)
    return [records[i]["where"] for i, _ in found]
